"""The run directory: where a run may be written, the lock that keeps a second run out of it,
and what ``--resume`` may change of the run it continues.

* A new run needs a directory that does not exist, is empty, or holds a zhilu run that never
  trained (its ``config.toml`` and nothing of training); ``--resume`` one that holds a run.
  A file, a path under a file, a place that cannot be written and a directory holding
  anything else are refused before anything is written.
* A run holds ``RUN/.lock`` (``fcntl.flock``, exclusive, with the holder's pid in it) for as
  long as it runs: a second run on the same directory is refused. The kernel drops the lock
  when its process ends in any way, ``kill -9`` included, so a crashed run can be resumed.
* ``--resume`` continues the same run: its ``config.toml`` is the base, the user's settings
  are overrides. A change of the model is refused; one that changes the trajectory is named.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from zhilu.config import JobConfig, load_config
from zhilu.errors import ZhiluError
from zhilu.launch.local import under_torchrun

FIELD = "run.out"
LOCK = ".lock"
DATA = "data.json"
CONFIG = "config.toml"
_held: dict[Path, int] = {}  # run directory (resolved) -> descriptor of its .lock, flocked by this process

# Settings that change what a resumed run computes from here on, and how.
_SCHEDULE = "the learning-rate schedule changes"
_UPDATES = "the optimizer's updates change"
TRAJECTORY = {
    "train.steps": _SCHEDULE, "train.warmup_steps": _SCHEDULE, "train.lr": _SCHEDULE, "train.min_lr": _SCHEDULE,
    "train.global_batch": "the batches change", "train.seq_len": "the batches change",
    "train.seed": "the order of the batches changes",
    "train.weight_decay": _UPDATES, "train.beta1": _UPDATES, "train.beta2": _UPDATES, "train.grad_clip": _UPDATES,
    "data.path": "the training data changes", "data.val_fraction": "the training data changes",
}


def check(out: Path, resume: bool, restarted: bool, locks: bool, steps: int | None = None) -> None:
    """Refuse ``out`` unless this job may write it (``locks``: this process is the one that takes the lock).

    ``--resume`` needs a zhilu run or nothing (a job requeued after a kill in its first
    seconds); with no checkpoint yet the run starts again, and one that finished (a checkpoint
    of its last step, ``steps``, and a summary saying so) has nothing left to do. A run that
    torchrun restarted continues from its newest good checkpoint, or from the start if it has none."""
    from zhilu.training.checkpoint_files import candidates

    problem = unwritable(out, directory=True)
    if problem:
        raise ZhiluError(FIELD, f"{problem}; valid: a directory path that can be written")
    if locks:
        _refuse_if_in_use(out)
    try:
        others = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    except OSError as e:
        raise ZhiluError(FIELD, f"cannot read {out} ({e.strerror}); valid: a directory that can be read") from None
    foreign = bool(others) and not is_run(out)
    if not (resume or restarted):
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
            raise ZhiluError(FIELD, f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        if foreign:
            raise ZhiluError(FIELD, f"{out} holds other files ({_names(others)}) and no zhilu run (no {CONFIG} of "
                                    "zhilu); valid: a new or empty directory")
        return
    if resume and foreign:
        raise ZhiluError(FIELD, f"{out} holds no zhilu run to resume (no {CONFIG} of zhilu); valid: the --out of an "
                                "earlier run")
    if not resume:
        return  # a restart under torchrun: the ranks choose the checkpoint
    # Which checkpoint is good is decided by the ranks, which check every file (in parallel)
    # and fall back past damaged ones; here only whether there is anything to continue.
    paths, _ = candidates(out)
    if not paths:  # killed before its first checkpoint (or before it wrote anything): start it
        what = "has no checkpoint yet; its run starts again" if (out / CONFIG).is_file() else "holds no run yet; it starts"
        print(f"zhilu: {out} {what} from step 0", file=sys.stderr)
        return
    step = next((m["step"] for m in map(_manifest_or_none, paths) if m is not None), None)
    if steps is not None and isinstance(step, int) and step >= steps and _ended(out) == "finished":
        raise ZhiluError("checkpoint.resume", f"{out} has finished its {steps} steps (its newest checkpoint is of step "
                                              f"{step}); valid: --steps larger than {step} to train on")


def check_data(out: Path, fingerprint: str | None, description: str, continuing: bool, allow_changed: bool) -> None:
    """A run that goes on (``--resume``, a restart) reads the data it trained on (``data.json``),
    unless ``data.allow_changed``."""
    import json

    if not continuing or fingerprint is None or allow_changed:
        return
    try:
        before = json.loads((out / DATA).read_text())
    except (OSError, ValueError):
        return  # a run from before data.json, or one killed before it was written
    if isinstance(before, dict) and before.get("fingerprint") not in (None, fingerprint):
        raise ZhiluError("data.path", f"{out} trained on {before.get('description')} (SHA-256 "
                                      f"{str(before.get('fingerprint'))[:12]}), this run reads {description} (SHA-256 "
                                      f"{fingerprint[:12]}); valid: the run's data, or --data.allow_changed true to "
                                      "continue on this data")


def write_data(out: Path, fingerprint: str | None, description: str) -> None:
    """Record in ``data.json`` which data the run reads."""
    import json

    from zhilu.durable import write_atomic

    write_atomic(out / DATA, json.dumps({"description": description, "fingerprint": fingerprint}, indent=1) + "\n")


def _ended(out: Path) -> object:
    """How the run's summary.json says it ended; None without one (killed before it was written:
    resumed, the run loads its last checkpoint and writes it)."""
    import json

    try:
        return json.loads((out / "summary.json").read_text()).get("ended")
    except (OSError, ValueError, AttributeError):
        return None


def _manifest_or_none(path: Path) -> dict | None:
    from zhilu.training.checkpoint_files import Unusable, read_manifest

    try:
        return read_manifest(path)
    except Unusable:
        return None


def unwritable(path: Path, directory: bool) -> str | None:
    """Why ``path`` cannot be written as a directory (``directory``) or as a file, or None.

    Finds out by creating and removing a nameless temporary file where it would go."""
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        if directory and not path.is_dir():
            return f"{path} is {'a broken link' if not path.exists() else 'a file'}, not a directory"
        if not directory and path.is_dir():
            return f"{path} is a directory, not a file"
        if not directory and path.exists() and not path.is_file():
            return f"{path} is not a regular file (a FIFO, socket or device)"
    where = path if directory and path.is_dir() else path.parent
    while not os.path.lexists(where):
        where = where.parent
    if not where.is_dir():
        return f"{path} is under {where}, which is {'a broken link' if not where.exists() else 'a file'}"
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        return f"cannot write in {where} ({e.strerror})"
    return None


def is_run(out: Path) -> bool:
    """``out`` holds a ``config.toml`` that zhilu reads as a job's configuration."""
    if not (out / CONFIG).is_file():
        return False
    try:
        load_config(str(out / CONFIG))
    except ZhiluError:
        return False
    return True


def acquire(out: Path) -> None:
    """Create ``out`` and hold its lock for the life of this process (until :func:`release`).

    Idempotent within a process; a lock another process holds is a ZhiluError naming its pid,
    and then nothing has been written."""
    key = out.resolve()
    if key in _held:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ZhiluError(FIELD, f"cannot write in {out} ({e.strerror}); valid: a directory path that can be "
                                "written") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise _in_use(out, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def release(out: Path) -> None:
    """Let go of ``out``'s lock if this process holds it (the file stays; a lock, not a marker)."""
    fd = _held.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def resumed(cfg: JobConfig, path: str | None, overrides: list[tuple[str, str]]) -> tuple[JobConfig, list[str]]:
    """The job ``--resume`` runs: the run's own ``config.toml``, then the TOML file ``path``, then
    ``overrides``; and one line for each setting that changes the run's trajectory.

    ``cfg`` is the user's job alone (defaults, ``path``, ``overrides``). A different model is
    refused; without ``--nproc``, a new plan sets the process count again, as for a new run,
    and under torchrun the processes are torchrun's."""
    if not cfg.run.out:
        raise ZhiluError(FIELD, "--resume continues the run in --out; valid: --out RUN, the directory of the run")
    saved_path = Path(cfg.run.out) / CONFIG
    if not saved_path.is_file():
        return cfg, []  # check() says what the directory lacks
    try:
        saved = load_config(str(saved_path))
    except ZhiluError as e:
        raise ZhiluError(FIELD, f"{saved_path} is not a configuration this zhilu reads ({e}); valid: the --out of "
                                "a run of this version of zhilu") from None
    job = load_config(path, overrides, base=str(saved_path))
    default = JobConfig()
    new_plan = cfg.parallel.plan != default.parallel.plan
    if (new_plan or under_torchrun()) and cfg.launch.nproc == default.launch.nproc:
        job = replace(job, launch=replace(job.launch, nproc=default.launch.nproc))
    _refuse_another_model(saved, job, Path(cfg.run.out))
    was, now = _flat(saved), _flat(job)
    return job, [f"resuming with {key}={_shown(now[key])} (the run was saved with {_shown(was[key])}): {why}"
                 for key, why in TRAJECTORY.items() if now[key] != was[key]]


def _refuse_another_model(saved: JobConfig, job: JobConfig, out: Path) -> None:
    was, now = _model(saved), _model(job)
    for key in was:
        if was[key] != now[key]:
            raise ZhiluError(f"model.{key}", f"{out} was trained with {_shown(was[key])}, this run asks for "
                                             f"{_shown(now[key])}; valid: the run's model (drop --model.{key}), "
                                             "or a new run with another --out")


def _model(cfg: JobConfig) -> dict[str, object]:
    """The model a job names: its name and its shape, a preset's own values where it keeps them."""
    from zhilu.models.presets import PRESETS
    from zhilu.models.registry import SHAPE_KEYS

    m = cfg.model
    shape: dict[str, object] = {key: getattr(m, key) for key in SHAPE_KEYS}
    if m.name in PRESETS:
        full = replace(PRESETS[m.name], **{k: v for k, v in shape.items() if v})
        shape = {key: full.kv_heads if key == "n_kv_heads" else getattr(full, key) for key in SHAPE_KEYS}
    return {"name": m.name, **shape}


def _flat(cfg: JobConfig) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _names(names: list[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(shown) + (f" and {len(names) - len(shown)} more" if len(names) > len(shown) else "")


def _refuse_if_in_use(out: Path) -> None:
    """A lock another process holds on ``out`` refuses the job before it checks or writes anything."""
    if out.resolve() in _held or not (out / LOCK).is_file():
        return
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:
        return  # acquire() says why it cannot write there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out, os.read(fd, 32).decode(errors="replace").strip()) from None
    finally:
        os.close(fd)  # also drops the lock if it was taken


def _in_use(out: Path, holder: str) -> ZhiluError:
    return ZhiluError(FIELD, f"{out} is in use by another zhilu run (pid {holder or 'unknown'}); valid: wait for it "
                             "to end, or choose another --out")
