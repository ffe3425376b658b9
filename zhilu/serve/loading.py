"""A run directory's trained model, ready to generate: spec, whole model, checkpoint step, tokenizer.

The model is the run's newest good checkpoint (checksums verified, metadata through the
allow-list, never unpickled), consolidated onto one device whatever plan trained it. The
tokenizer is the model's own (``hf:DIR``), the prepared dataset's (``zhilu data prepare``),
or UTF-8 bytes for a model trained on raw text; a run on token ids alone has none and is
served token ids only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zhilu.errors import ZhiluError
from zhilu.spec import ModelSpec

FIELD = "RUN_DIR"


class TextTokenizer:
    """What serving needs of a tokenizer: text <-> ids and the id that ends a text (if any)."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 eos_id: int | None, name: str) -> None:
        self.encode, self.decode, self.eos_id, self.name = encode, decode, eos_id, name


@dataclass
class LoadedRun:
    run_dir: Path
    spec: ModelSpec
    model: nn.Module  # the whole model, in eval mode
    step: int  # of the checkpoint it was loaded from
    checkpoint: Path
    tokenizer: TextTokenizer | None
    max_seq_len: int  # longest context the model takes


def newest_checkpoint(run_dir: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose files match its manifest (damaged ones named on ``say``)."""
    from zhilu.training.checkpoint_files import newest_good

    return newest_good(run_dir, say=say or (lambda line: print(line, file=sys.stderr)))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: Path | None = None) -> LoadedRun:
    """The model of ``run_dir`` (its newest good checkpoint unless ``checkpoint`` is given), on ``device``."""
    from zhilu.config import load_config
    from zhilu.models.registry import spec_of
    from zhilu.training.checkpoint import load_model
    from zhilu.training.checkpoint_files import read_manifest

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.toml").is_file():
        raise ZhiluError(FIELD, f"{run_dir} is not a zhilu run directory (no config.toml); valid: the --out of "
                                "a zhilu train run")
    cfg = load_config(str(run_dir / "config.toml"))
    spec = spec_of(cfg)
    if not spec.is_language_model:
        raise ZhiluError(FIELD, f"{run_dir} trained {spec.name}, which is not a language model over token ids; "
                                "valid: a run of a language model")
    path = checkpoint or newest_checkpoint(run_dir)
    if path is None:
        raise ZhiluError(FIELD, f"{run_dir} holds no good checkpoint; valid: a run that saved one "
                                "(--checkpoint.every, or the end of training)")
    model = spec.create(device)
    load_model(path, model, no_dist=True, hashed=checkpoint is None)  # newest_good has just checked it
    model.eval()
    step = int(read_manifest(path)["step"])
    max_len = spec.max_seq_len or cfg.train.seq_len
    return LoadedRun(run_dir, spec, model, step, path, _tokenizer(cfg, spec), max_len)


def _tokenizer(cfg: Any, spec: ModelSpec) -> TextTokenizer | None:
    from zhilu.data.manifest import is_prepared

    if spec.tokenizer is not None:
        tok: Any = spec.tokenizer
        return TextTokenizer(tok.encode, tok.decode, _hf_eos_id(spec), f"{spec.name}'s tokenizer")
    if is_prepared(cfg.data.path):
        from zhilu.data import manifest as mf
        from zhilu.data import tokenizer as tk

        directory = Path(cfg.data.path).expanduser()
        manifest, _ = mf.read(directory, FIELD)
        t = tk.load(directory, manifest["tokenizer"])
        return TextTokenizer(t.encode, t.decode, t.eos_id, manifest["settings"]["tokenizer"])
    if str(cfg.data.path).endswith(".bin"):
        return None  # token ids with no text form

    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    return TextTokenizer(encode, decode, None, "bytes")


def _hf_eos_id(spec: ModelSpec) -> int | None:
    """``eos_token_id`` of an ``hf:DIR`` model's config.json (the first, where it lists several)."""
    import json

    source = spec.source or ""
    try:
        eos = json.loads((Path(source[3:]).expanduser() / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) and source.startswith("hf:") else None


def chat_template(run: LoadedRun) -> Callable[[list[dict[str, str]]], str] | None:
    """Messages -> prompt text, by the chat template of a Hugging Face model's ``tokenizer_config.json``
    (rendered in Jinja's sandbox, as transformers does); None for a model without one."""
    import json

    source = run.spec.source or ""
    if not source.startswith("hf:"):
        return None
    try:
        config = json.loads((Path(source[3:]).expanduser() / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    special = {k: v if isinstance(v, str) else (v or {}).get("content", "")
               for k, v in config.items() if k in ("bos_token", "eos_token")}

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, **special)

    return render
