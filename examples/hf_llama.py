"""A Hugging Face model in zhilu: a tiny Llama made locally, then trained under a plan.

    .venv/bin/python examples/hf_llama.py                      # tensor parallel over 2 processes
    .venv/bin/python examples/hf_llama.py --plan pp=2,mb=4     # or any other plan

Writes a 4-layer Llama (``save_pretrained``: config.json and model.safetensors) to
``runs/tiny-llama``, trains it with ``zhilu.train("hf:runs/tiny-llama", ...)`` on the Python
standard library's bytes, and prints its final losses. See examples/hf_model.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

import zhilu
from zhilu.errors import ZhiluError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="tp=2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model-dir", default="runs/tiny-llama")
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary = zhilu.train(f"hf:{args.model_dir}", plan=args.plan, steps=args.steps, seq_len=64,
                                  out=str(Path(tmp) / "run"), settings={"train.sample_tokens": 0})
        except ZhiluError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"{summary['model']} under {args.plan}: {summary['params']:,} parameters, final loss "
          f"{summary['final_loss']:.3f}, validation {summary['final_val_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
