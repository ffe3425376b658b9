"""Sharded, atomic, verified checkpoints through torch.distributed.checkpoint (DCP).

Layout under ``RUN_DIR/checkpoints/``::

    step-00000100/        DCP files (each rank writes its shards) + manifest.json
    latest                name of the newest complete checkpoint (``step-NNNNNNNN``, nothing else)

A save, synchronous or in the background (``checkpoint.async``):

1. every rank writes its shards into ``.step-NNNNNNNN.tmp`` (DCP fsyncs each file);
2. rank 0 fsyncs the folder and writes ``manifest.json`` last: each file's size and SHA-256,
   the trainer's position (step, data loader, bad steps), plan, world size, versions;
3. the folder is renamed into place, and only then ``latest`` is moved (both fsynced);
4. the newest ``checkpoint.keep`` complete checkpoints are kept, never the one ``latest`` names.

A crash at any point leaves ``latest`` on the previous complete checkpoint. What is saved:
model and optimizer tensors keyed by the whole model's parameter names (DCP reshards, so any
layout loads them) and every rank's RNG states; the rest is JSON in the manifest. Loading
checks the manifest and checksums first (each rank hashes its share), falls back to the
newest good checkpoint, and never runs code from the files (:mod:`zhilu.training.dcp_reader`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from zhilu.durable import fsync_dir, write_atomic
from zhilu.training import faults as fault_injection
from zhilu.training.checkpoint_files import (
    Unusable,
    candidates,
    changed_files,
    latest_checkpoint,
    name_of,
    read_manifest,
    refuse_none_good,
    verify,
)
from zhilu.training.dcp_reader import CheckpointReader
from zhilu.training.direct_io import DirectWriter, sha256_direct

__all__ = ["Checkpointer", "CheckpointReader", "latest_checkpoint", "load_model", "params_sha256", "verify"]

_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
# DCP warns when it runs without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is collective (all ranks call it).

    ``about``: what the manifest records besides the trainer's state (plan, world size, ...)."""

    def __init__(self, run_dir: Path, keep: int, background: bool = False, about: dict[str, Any] | None = None,
                 faults: fault_injection.Faults = fault_injection.NONE) -> None:
        self.run_dir, self.root, self.keep = run_dir, run_dir / "checkpoints", keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.about, self.faults = about or {}, faults
        # DCP's background save runs collectives of its own: on a group of their own, so they
        # never interleave with training's.
        self.background = background
        self.group = dist.new_group(backend="gloo") if background and self.world > 1 else None
        self._pending: tuple[Future, threading.Thread | None] | None = None
        self._stager: DefaultStager | None = None
        self._error: BaseException | None = None
        if self.rank == 0 and self.root.is_dir():  # leftovers of saves that a crash interrupted
            for stale in [*self.root.glob(".step-*.tmp"), *self.root.glob(".step-*.old")]:
                shutil.rmtree(stale, ignore_errors=True)

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             trainer_state: dict[str, Any]) -> None:
        """Write a checkpoint of ``step``; in the background (returns once the state is
        copied) when ``background``, after waiting for the previous background save."""
        self.wait()
        tmp = self.root / f".{name_of(step)}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        self.faults.begin_save(step)
        state = _tensors(parts, optimizers)
        state["rng"] = _rng_states(self.rank)
        writer = _writer(tmp, self.faults)
        if not self.background:
            dcp.save(state, storage_writer=writer)
            if self.rank == 0:
                self._complete(step, tmp, trainer_state)
            _barrier()
            return
        if self._stager is None:  # kept between saves: the copy of the state reuses its memory
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        future = dcp.async_save(state, storage_writer=writer, process_group=self.group, async_stager=self._stager)
        thread = None
        if self.rank == 0:  # finish the checkpoint (checksums, rename, latest) once every rank has written
            thread = threading.Thread(target=self._complete_after, args=(future, step, tmp, trainer_state),
                                      name="zhilu-checkpoint", daemon=True)
            thread.start()
        self._pending = (future, thread)

    def wait(self) -> None:
        """Block until the background save, if any, is complete; re-raise its failure."""
        if self._pending is None:
            return
        future, thread = self._pending
        self._pending = None
        future.result()
        if thread is not None:
            thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _complete_after(self, future: Future, step: int, tmp: Path, trainer_state: dict[str, Any]) -> None:
        _yield_cpu()  # checksums and renames in the background, on idle CPU time
        try:
            future.result()
            self._complete(step, tmp, trainer_state)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def _complete(self, step: int, tmp: Path, trainer_state: dict[str, Any]) -> None:
        """Rank 0, once every rank's files are written: manifest, rename, ``latest``, pruning."""
        fsync_dir(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"format": 2, "step": step, "trainer": trainer_state, **self.about,
                    "files": {p.name: sha256_direct(p) for p in files},
                    "sizes": {p.name: p.stat().st_size for p in files}}
        self.faults.on_write()
        write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
        final = self.root / name_of(step)
        old = self.root / f".{final.name}.old"
        if final.exists():  # saved again after a fall back past a damaged one: swap, then delete
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)
        self.faults.on_write()
        write_atomic(self.root / "latest", final.name + "\n")
        self.faults.begin_save(0)
        self.faults.after_save(step, final)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        """Keep the newest ``keep`` complete checkpoints (incomplete ones do not count), always ``newest``."""
        if self.keep <= 0:
            return
        complete = sorted((p for p in self.root.glob("step-*") if (p / "manifest.json").is_file()),
                          key=lambda p: p.name)
        for old in complete[: -self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------
    def newest_good(self, say: Callable[[str], None]) -> Path | None:
        """The checkpoint to continue from: the newest good one (each one passed over, and a bad
        ``latest``, is named by rank 0 through ``say``). None: there is none at all; a
        ZhiluError: there are checkpoints and none is good."""
        paths, notes = candidates(self.run_dir)
        rejected = []
        for path in paths:
            problem = self._problem(path)
            if problem is None:
                if self.rank == 0 and notes + rejected:
                    say(f"zhilu: {'; '.join(notes + rejected)}; using {path.name}")
                return path
            rejected.append(f"{path.name} {problem}")
        refuse_none_good(self.run_dir, notes + rejected)
        return None

    def _problem(self, path: Path) -> str | None:
        """Why ``path`` must not be loaded, agreed by every rank (each hashes its share), or None."""
        try:
            manifest = read_manifest(path)
            CheckpointReader(path, set(manifest["files"])).read_metadata()
            bad = changed_files(path, manifest, self.rank, self.world)
            problem = f"is damaged ({', '.join(bad)} changed since it was saved)" if bad else ""
        except Unusable as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - a ZhiluError from the reader, or I/O
            problem = getattr(e, "message", str(e)).removeprefix(f"{path} ")
        if self.world > 1:
            problems: list[str] = [""] * self.world
            dist.all_gather_object(problems, problem)  # zhilu's own processes, not the checkpoint
            problem = next((p for p in problems if p), "")
        return problem or None

    def load(self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
        """Restore the model parts, their optimizers and this rank's RNG states from a checkpoint
        :meth:`newest_good` chose; returns the manifest."""
        manifest = read_manifest(path)
        state = _tensors(parts, optimizers)
        reader = CheckpointReader(path, set(manifest["files"]))
        saved = reader.read_metadata().state_dict_metadata
        rng = {k: v for k, v in _rng_states(self.rank).items() if f"rng.{k}" in saved}
        if rng:
            state["rng"] = rng
        dcp.load(state, storage_reader=reader)
        for part, optimizer in zip(parts, optimizers):
            model_sd = get_model_state_dict(part)
            set_model_state_dict(part, {k: state["model"][k] for k in model_sd})
            full_optim = get_optimizer_state_dict(part, optimizer, options=_OPTIM)
            full_optim.update({k: state["optim"][k] for k in full_optim if k in state["optim"]})
            set_optimizer_state_dict(part, optimizer, full_optim, options=_OPTIM)
        _set_rng_states(state.get("rng", {}), self.rank)
        return manifest


def load_model(path: Path, model: nn.Module, no_dist: bool = False, hashed: bool = False) -> None:
    """Load only the model weights of a checkpoint into ``model`` (any layout: DCP reshards),
    after checking its files against the manifest.

    ``no_dist``: this process loads alone, even if it belongs to a process group. ``hashed``:
    this process has just written and hashed the checkpoint, so its checksums are not read
    again (the metadata still goes through the allow-list)."""
    manifest = read_manifest(path) if hashed else verify(path)
    state = {"model": get_model_state_dict(model)}
    reader = CheckpointReader(path, set(manifest["files"]))
    reader.read_metadata()  # refuses here, with zhilu's message, before DCP wraps errors of its own
    dcp.load(state, storage_reader=reader, no_dist=no_dist)
    set_model_state_dict(model, state["model"])


def params_sha256(path: Path, budget_bytes: int = 1 << 30) -> str:
    """SHA-256 over every model tensor of a checkpoint, whole, in name order (name, dtype, shape,
    bytes), whatever layout saved it: two runs compare bit for bit. This process reads alone,
    ``budget_bytes`` of tensors at a time."""
    import hashlib

    manifest = read_manifest(path)
    metadata = CheckpointReader(path, set(manifest["files"])).read_metadata().state_dict_metadata
    names = sorted(k for k in metadata if k.startswith("model."))
    h = hashlib.sha256()
    for batch in _batches(names, lambda k: metadata[k].size.numel() * metadata[k].properties.dtype.itemsize,
                          budget_bytes):
        state = {"model": {k.removeprefix("model."): torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype)
                           for k in batch}}
        dcp.load(state, storage_reader=CheckpointReader(path, set(manifest["files"])), no_dist=True)
        for k in batch:
            t = state["model"][k.removeprefix("model.")].contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _batches(names: list[str], size: Callable[[str], int], budget: int) -> Iterator[list[str]]:
    batch, used = [], 0
    for k in names:
        if batch and used + size(k) > budget:
            yield batch
            batch, used = [], 0
        batch.append(k)
        used += size(k)
    if batch:
        yield batch


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


def _rng_states(rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states (CPU, and CUDA when present), under keys only it saves."""
    states = {f"{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states[f"{rank}.cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, torch.Tensor], rank: int) -> None:
    if f"{rank}.cpu" in states:
        torch.set_rng_state(states[f"{rank}.cpu"])
    if f"{rank}.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[f"{rank}.cuda"])


class _FileSystem(FileSystem):
    """DCP's file system. Files are written past the page cache (:mod:`zhilu.training.direct_io`)
    and, in a background save, on CPU time training leaves idle, so a save takes little of the
    cores training keeps busy; each file opened for writing is reported to the fault injector."""

    def __init__(self, faults: fault_injection.Faults) -> None:
        self.faults = faults

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        _yield_cpu()
        self.faults.on_write()
        with DirectWriter(path) as stream:
            yield stream


# Where Linux's SCHED_IDLE is missing, nice 13: weighed at 43 against 1024 for nice 0
# (sched_prio_to_weight), on a core training keeps busy the background write gets about 4%.
BACKGROUND_NICE = 13


def _yield_cpu() -> None:
    """Run this thread, unless it is the main (training) thread, only on CPU time training
    leaves idle (SCHED_IDLE: the gaps of its serial parts and waits), else at BACKGROUND_NICE."""
    if threading.current_thread() is threading.main_thread():
        return
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)


def _writer(path: Path, faults: fault_injection.Faults) -> FileSystemWriter:
    writer = FileSystemWriter(path, sync_files=True)
    writer.fs = _FileSystem(faults)
    return writer


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
