"""``zhilu export``: a run's newest good checkpoint as safetensors, loadable without the training stack.

    zhilu export runs/tiny --out exports/tiny [--max-shard-gb 2]

For zhilu's GPT: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, in Hugging Face's index format, past ``--max-shard-gb``),
``config.json`` (``zhilu-export/1``: the GPT's shape, the checkpoint step, the tokenizer) and
the tokenizer's ``tokenizer.json`` where it has one; :func:`load_export` builds the model
from them. A tied output weight is stored once, as ``tok_embeddings.weight``. For a model
trained from ``hf:DIR``: a directory ``transformers.AutoModelForCausalLM.from_pretrained``
loads, with DIR's tokenizer files and ``zhilu_export.json``. The directory appears whole or
not at all (written beside it, then renamed). Values are bitwise those of the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zhilu.durable import fsync_dir
from zhilu.errors import ZhiluError

FORMAT = "zhilu-export/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def export(run_dir: str | Path, out: str | Path, max_shard_bytes: int = 2 * 1024**3) -> dict[str, Any]:
    """Write the model of ``run_dir`` into ``out`` (new or empty); a summary of what was written."""
    from zhilu.serve.loading import load_run

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZhiluError("--out", f"{out} exists and is not an empty directory; valid: a new or empty directory")
    if max_shard_bytes < 1:
        raise ZhiluError("--max-shard-gb", "must be above 0")
    run = load_run(run_dir, "cpu")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        if (run.spec.source or "").startswith("hf:"):
            _export_hf(run, tmp, max_shard_bytes)
        else:
            _export_gpt(run, tmp, max_shard_bytes)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ZhiluError("--out", f"cannot write {out} ({e.strerror or e}); valid: a directory that can be "
                                  "written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    return {"out": str(out), "step": run.step, "files": files,
            "bytes": sum((out / f).stat().st_size for f in files)}


def _export_gpt(run: Any, out: Path, max_shard_bytes: int) -> None:
    model = run.model
    cfg = model.cfg
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del state["output.weight"]  # the same tensor as tok_embeddings.weight
    _save_shards(state, out, max_shard_bytes)
    config = {"format": FORMAT, "architecture": "zhilu-gpt", "model": run.spec.name,
              "gpt_config": dataclasses.asdict(cfg), "step": run.step, "source_run": str(run.run_dir),
              "tokenizer": _tokenizer(run, out)}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def _save_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        n = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")


def _tokenizer(run: Any, out: Path) -> dict[str, Any] | None:
    """The run's tokenizer as the export records it (its tokenizer.json copied into ``out``)."""
    from zhilu.config import load_config
    from zhilu.data import manifest as mf

    path = load_config(str(run.run_dir / "config.toml")).data.path
    if mf.is_prepared(path):
        entry = mf.read(Path(path).expanduser())[0]["tokenizer"]
        if entry["kind"] != "bytes":
            shutil.copyfile(Path(path).expanduser() / entry["file"], out / "tokenizer.json")
            return {"kind": entry["kind"], "file": "tokenizer.json", "eos_id": entry.get("eos_id")}
        return {"kind": "bytes", "eos_id": entry.get("eos_id")}
    return None if run.tokenizer is None else {"kind": "bytes", "eos_id": None}


def _export_hf(run: Any, out: Path, max_shard_bytes: int) -> None:
    import transformers

    from zhilu.models.hf import PREFIX

    source = Path(run.spec.source[3:]).expanduser()
    config = transformers.AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_model.to_empty(device="cpu")
    state = {name if name.startswith("lm_head.") else f"{PREFIX}.{name}": t
             for name, t in run.model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ZhiluError("RUN_DIR", f"{run.spec.name}: the trained weights do not match the transformers model "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    _refresh_rotary(hf_model)
    hf_model.save_pretrained(out, max_shard_size=max_shard_bytes)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copyfile(source / name, out / name)
    (out / "zhilu_export.json").write_text(json.dumps({"format": FORMAT, "step": run.step, "source_run":
                                                       str(run.run_dir), "source_model": str(source)}, indent=1))


def _refresh_rotary(hf_model: nn.Module) -> None:
    """Recompute the rotary tables ``to_empty`` left empty (non-persistent buffers are not saved)."""
    for module in hf_model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device("cpu"):
                fresh = type(module)(hf_model.config)
            for name, buffer in fresh.named_buffers():
                module.get_buffer(name).copy_(buffer)


def load_export(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """zhilu's GPT from an export's ``config.json`` and safetensors (never a pickle), in eval mode."""
    from safetensors.torch import load_file

    from zhilu.models.gpt.model import GPT
    from zhilu.models.presets import GPTConfig

    directory = Path(directory).expanduser()
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ZhiluError("DIR", f"{directory} has no readable config.json ({e}); valid: what zhilu export "
                                "wrote") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("architecture") != "zhilu-gpt":
        raise ZhiluError("DIR", f"{directory}/config.json is not a {FORMAT} export of zhilu's GPT (an hf:DIR "
                                "model's export loads with transformers)")
    cfg = GPTConfig(**config["gpt_config"])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables; every parameter is overwritten below
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(directory / f), device=str(device)))
    params = dict(model.named_parameters())  # a tied output weight is listed once, as tok_embeddings.weight
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ZhiluError("DIR", f"{directory}: tensors {missing[:3]} missing, {unexpected[:3]} unexpected; "
                                "valid: an export of this config")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return model.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out of a zhilu train run")
    parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="split the weights into files of at most "
                        "this many GB, with an index (default 2)")


def run(args: argparse.Namespace) -> int:
    summary = export(args.run_dir, args.out, int(args.max_shard_gb * 1e9))
    print(f"exported step {summary['step']} of {args.run_dir} to {summary['out']} ({len(summary['files'])} files, "
          f"{summary['bytes'] / 1e6:.1f} MB)")
    return 0
