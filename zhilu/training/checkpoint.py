"""Sharded, atomic checkpoints through torch.distributed.checkpoint (DCP).

Layout under ``RUN_DIR/checkpoints/``::

    step-00000100/        DCP files (each rank writes its shards) + manifest.json
    latest                name of the newest complete checkpoint

A checkpoint is written into ``.step-NNNNNNNN.tmp`` and renamed only after every rank has
finished and rank 0 has recorded each file's SHA-256 in the manifest, so a crash mid-save
never leaves a directory that looks complete. Only tensors go into DCP (no pickled objects
in the checkpoint's data); the trainer's position (step, data loader) lives in the manifest
as JSON. DCP reshards on load, so a run can resume on a different number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from zhilu.errors import ZhiluError

_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
# DCP warns when it runs without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, is_main: bool) -> None:
        self.root = run_dir / "checkpoints"
        self.keep = keep
        self.is_main = is_main

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        name = f"step-{step:08d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(_tensors(parts, optimizers), checkpoint_id=str(tmp))
        if self.is_main:
            manifest = {"step": step, "trainer": trainer_state, "files": _checksums(tmp)}
            _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", name + "\n")
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
        """Collective: restore the model parts and their optimizers in place; returns the
        trainer state. The launcher has already checked the files against the manifest."""
        manifest = json.loads((path / "manifest.json").read_text())
        state = _tensors(parts, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        for part, optimizer in zip(parts, optimizers):
            model_sd = get_model_state_dict(part)
            set_model_state_dict(part, {k: state["model"][k] for k in model_sd})
            full_optim = get_optimizer_state_dict(part, optimizer, options=_OPTIM)
            full_optim.update({k: state["optim"][k] for k in full_optim if k in state["optim"]})
            set_optimizer_state_dict(part, optimizer, full_optim, options=_OPTIM)
        return manifest["trainer"]

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_model(path: Path, model: nn.Module, no_dist: bool = False) -> None:
    """Load only the model weights of a checkpoint into ``model`` (any layout: DCP reshards).

    ``no_dist``: this process loads alone, even if it belongs to a process group."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_model_state_dict(model, state["model"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "manifest.json").is_file() else None


def verify(path: Path) -> None:
    """Check every file of a checkpoint against the SHA-256 its manifest recorded."""
    manifest = json.loads((path / "manifest.json").read_text())
    bad = [f for f, digest in manifest["files"].items() if not (path / f).is_file() or _sha256(path / f) != digest]
    if bad:
        raise ZhiluError("checkpoint.resume", f"{path} is damaged ({', '.join(bad)} changed since it was saved); "
                         "delete that directory to resume from the one before")


def _tensors(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters and the optimizers' per-parameter tensors (not their hyperparameters), keyed
    by the parameters' names in the whole model, so any layout can load them."""
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    for part, optimizer in zip(parts, optimizers):
        model.update(get_model_state_dict(part))
        optim.update((k, v) for k, v in get_optimizer_state_dict(part, optimizer, options=_OPTIM).items()
                     if k.startswith("state."))
    return {"model": model, "optim": optim}


def _checksums(directory: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
