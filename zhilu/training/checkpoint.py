"""Sharded, atomic checkpoints through torch.distributed.checkpoint (DCP).

Layout under ``RUN_DIR/checkpoints/``::

    step-00000100/        DCP files (each rank writes its shards) + manifest.json
    latest                name of the newest complete checkpoint (``step-NNNNNNNN``, nothing else)

A checkpoint is written into ``.step-NNNNNNNN.tmp`` and renamed only after every rank has
finished and rank 0 has recorded each file's SHA-256 in the manifest, so a crash mid-save
never leaves a directory that looks complete. Only tensors go into DCP; the trainer's
position (step, data loader) lives in the manifest as JSON. DCP reshards on load, so a run
can resume on a different number of processes.

Loading never runs code from a checkpoint. Every load first checks each file against the
manifest's SHA-256 (which catches damage, not tampering: whoever can write the files can
rewrite the manifest), then reads through :class:`CheckpointReader`:

* ``.metadata`` is a pickle, which DCP's ``FileSystemReader`` reads with plain
  ``pickle.load``. Here it goes through :class:`_MetadataUnpickler`, which resolves only the
  globals in :data:`_ALLOWED` (DCP's metadata dataclasses, ``_StorageInfo``, ``torch.Size``,
  torch dtypes and layouts, ``pathlib.PosixPath``: what ``pickletools.dis`` shows in the
  ``.metadata`` of every plan zhilu writes) and refuses any other, so the metadata can only
  be built of those objects. It must describe tensors only, stored in files the manifest lists.
* Tensor data (``__R_N.distcp``) are read by DCP with ``torch.load(weights_only=True)``:
  torch's own restricted unpickler, which builds tensors and plain containers only.
* DCP's "bytes" items would be read with ``torch.load(weights_only=False)``, an
  unrestricted unpickle. zhilu never saves them: ``BytesStorageMetadata`` is not on the
  allow-list and :meth:`CheckpointReader.read_data` refuses any bytes item.

So the only objects unpickled from a checkpoint are allow-listed metadata objects and the
tensors torch's weights-only loader builds. (With a process group DCP also exchanges its
plans and the parsed metadata between ranks as pickles; those come from zhilu's own
processes, not from the checkpoint.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
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

_FIELD = "checkpoint.resume"
_NAME = re.compile(r"step-[0-9]{8,}")  # what save() names a checkpoint (f"step-{step:08d}")
_DCP_MD = "torch.distributed.checkpoint.metadata"
# Every global a DCP .metadata of zhilu refers to (pickletools.dis of checkpoints saved with
# dp, zero=3, tp and pp plans), plus pathlib's 3.13 module name. Torch dtypes are allowed by
# type below. Nothing here runs code: dataclasses, torch.Size, an enum, a path, and
# torch.serialization._get_layout (which looks a torch.layout up by its name).
_ALLOWED = {
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "TensorProperties"),
    (_DCP_MD, "ChunkStorageMetadata"), (_DCP_MD, "MetadataIndex"), (_DCP_MD, "StorageMeta"),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: globals off the allow-list are refused."""

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise ZhiluError(_FIELD, f"{self.where}: its .metadata refers to {module}.{name}, which DCP metadata never "
                         "holds; zhilu refuses to load it (unpickling it could run code from the checkpoint)")


class CheckpointReader(FileSystemReader):
    """DCP's file reader without its unrestricted unpickling (see the module docstring).

    ``files``: the only files the metadata may name (a checkpoint's manifest); None: any
    plain file name inside the checkpoint directory."""

    def __init__(self, path: Path, files: set[str] | None = None) -> None:
        super().__init__(path)
        self.where, self.files = Path(path), files

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback for rank-local metadata, which zhilu never writes
            raise self._refuse("has no global .metadata")
        try:
            data = (self.where / ".metadata").read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(data), self.where).load()
        except ZhiluError:
            raise
        except Exception as e:  # truncated or garbage pickle, missing file
            raise self._refuse(f"has an unreadable .metadata ({type(e).__name__}: {e})") from None
        self._check(metadata)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):  # torch.load(weights_only=False)
            raise self._refuse("holds a pickled object (a DCP bytes item), not only tensors")
        return super().read_data(plan, planner)

    def _check(self, md: Any) -> None:
        if not (isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict)
                and isinstance(md.storage_data, dict) and isinstance(md.storage_meta, (StorageMeta, type(None)))):
            raise self._refuse("has a .metadata that is not DCP metadata")
        if not all(isinstance(v, TensorStorageMetadata) for v in md.state_dict_metadata.values()):
            raise self._refuse("holds something other than tensors")
        for index, info in md.storage_data.items():
            name = getattr(info, "relative_path", None)
            if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo) and _plain(name)
                    and (self.files is None or name in self.files)):
                raise self._refuse(f"has a .metadata that names {name!r}, not a file of this checkpoint")

    def _refuse(self, what: str) -> ZhiluError:
        return ZhiluError(_FIELD, f"{self.where} {what}; zhilu refuses to load it")


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, is_main: bool) -> None:
        self.root = run_dir / "checkpoints"
        self.keep = keep
        self.is_main = is_main

    def latest(self, strict: bool = False) -> Path | None:
        return latest_checkpoint(self.root.parent, strict)

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
        """Collective: check the files against the manifest (each rank hashes its share; all
        refuse together), restore the model parts and their optimizers in place; returns the
        trainer state."""
        manifest = _manifest(path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        files = sorted(manifest["files"].items())
        bad = torch.tensor([i % world == rank and _changed(path, f, digest) for i, (f, digest) in enumerate(files)],
                           dtype=torch.int32)
        if world > 1:
            if dist.get_backend() == "nccl":
                bad = bad.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(bad)
        _refuse_damaged(path, [f for (f, _), b in zip(files, bad.tolist()) if b])
        state = _tensors(parts, optimizers)
        _dcp_load(state, path, set(manifest["files"]), no_dist=False)
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


def load_model(path: Path, model: nn.Module, no_dist: bool = False, hashed: bool = False) -> None:
    """Load only the model weights of a checkpoint into ``model`` (any layout: DCP reshards),
    after checking its files against the manifest.

    ``no_dist``: this process loads alone, even if it belongs to a process group. ``hashed``:
    this process has just written and hashed the checkpoint, so its checksums are not read
    again (the metadata still goes through the allow-list)."""
    manifest = _manifest(path) if hashed else verify(path)
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, path, set(manifest["files"]), no_dist=no_dist)
    set_model_state_dict(model, state["model"])


def latest_checkpoint(run_dir: Path, strict: bool = False) -> Path | None:
    """The newest complete checkpoint of a run directory, or None.

    ``checkpoints/latest`` must hold the name (``step-NNNNNNNN``) of a directory directly
    inside ``checkpoints/`` that has a manifest; anything else (garbage, a path, a link) is
    no valid pointer: None, or with ``strict`` a ZhiluError that says why and what is valid."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    problem = None
    if pointer.is_symlink() or not pointer.is_file():
        problem = "is not a plain file"
    else:
        try:
            with open(pointer, "rb") as f:
                raw = f.read(101)
        except OSError as e:
            raw = f"<unreadable: {e.strerror}>".encode()
        name = raw.decode("ascii", "replace").strip()
        if not _NAME.fullmatch(name):
            problem = f"holds {raw[:40]!r}{'...' if len(raw) > 40 else ''}, not the name of a checkpoint"
        elif (root / name).is_symlink() or not (root / name / "manifest.json").is_file():
            problem = f"names {name}, which is not a complete checkpoint in {root} (no manifest.json)"
    if problem is None:
        return root / name
    if strict:
        found = sorted(p.name for p in root.glob("step-*") if not p.is_symlink() and (p / "manifest.json").is_file())
        raise ZhiluError(_FIELD, f"{pointer} {problem}; valid: the name of a checkpoint directory in {root}"
                         + (f" ({', '.join(found)})" if found else ", and there is none"))
    return None


def verify(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against the SHA-256 its manifest recorded, and its
    ``.metadata`` against the allow-list (no code runs). Returns the manifest."""
    manifest = _manifest(path)
    _refuse_damaged(path, [f for f, digest in sorted(manifest["files"].items()) if _changed(path, f, digest)])
    CheckpointReader(path, set(manifest["files"])).read_metadata()
    return manifest


def _manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest.get("files") if isinstance(manifest, dict) else None
        ok = (isinstance(files, dict) and ".metadata" in files and all(isinstance(d, str) for d in files.values())
              and "trainer" in manifest)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ZhiluError(_FIELD, f"{path}: its manifest.json cannot be read ({e})") from None
    if not ok:
        raise ZhiluError(_FIELD, f"{path}: its manifest.json is not a zhilu checkpoint manifest")
    return manifest


def _changed(path: Path, name: str, digest: str) -> bool:
    return not _plain(name) or not (path / name).is_file() or _sha256(path / name) != digest


def _refuse_damaged(path: Path, bad: list[str]) -> None:
    if bad:
        raise ZhiluError(_FIELD, f"{path} is damaged ({', '.join(bad)} changed since it was saved); to resume from "
                         f"an earlier checkpoint, delete it and write that one's name into {path.parent / 'latest'}")


def _dcp_load(state: dict[str, Any], path: Path, files: set[str], no_dist: bool) -> None:
    reader = CheckpointReader(path, files)
    reader.read_metadata()  # refuses here, with zhilu's message, before DCP wraps errors of its own
    dcp.load(state, storage_reader=reader, no_dist=no_dist)


def _plain(name: Any) -> bool:
    """A file name directly inside a directory (no path, no '.' or '..')."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in ("/", "\\", "\0")))


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
