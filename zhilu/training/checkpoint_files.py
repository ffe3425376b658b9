"""The files of a run's checkpoints: manifests, checksums, the ``latest`` pointer, and which
checkpoint is the newest good one.

A checkpoint ``checkpoints/step-NNNNNNNN/`` is complete when it has a ``manifest.json``
(written last, after every file is fsynced) and good when every file the manifest lists
still has the size and SHA-256 recorded there and its ``.metadata`` passes the allow-list
(:mod:`zhilu.training.dcp_reader`). ``latest`` names the newest one completed; a run
continues from the newest good checkpoint, and names what it passed over.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zhilu.durable import sha256
from zhilu.errors import ZhiluError
from zhilu.training.dcp_reader import FIELD, CheckpointReader, plain

STEP_NAME = re.compile(r"step-[0-9]{8,}")  # what a checkpoint is named (f"step-{step:08d}")


def name_of(step: int) -> str:
    return f"step-{step:08d}"


class Unusable(Exception):
    """A checkpoint (or the pointer to one) that must not be loaded; the message says why."""


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise Unusable("has no manifest.json (it was never completed)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Unusable(f"has an unreadable manifest.json ({type(e).__name__})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and ".metadata" in files and isinstance(manifest.get("trainer"), dict)
            and all(plain(f) and isinstance(d, str) for f, d in files.items())):
        raise Unusable("has a manifest.json that is not a zhilu checkpoint manifest")
    return manifest


def changed_files(path: Path, manifest: dict[str, Any], rank: int = 0, world: int = 1) -> list[str]:
    """The files of ``manifest`` (this rank's share: every ``world``-th from ``rank``) whose
    size or SHA-256 differ from what was recorded, or that are missing."""
    sizes = manifest.get("sizes", {})
    bad = []
    for i, (name, digest) in enumerate(sorted(manifest["files"].items())):
        if i % world != rank:
            continue
        f = path / name
        if f.is_symlink() or not f.is_file() or (name in sizes and f.stat().st_size != sizes[name]) \
                or sha256(f) != digest:
            bad.append(name)
    return bad


def check(path: Path) -> dict[str, Any]:
    """This process checks a whole checkpoint; returns its manifest, raises :class:`Unusable`."""
    manifest = read_manifest(path)
    bad = changed_files(path, manifest)
    if bad:
        raise Unusable(f"is damaged ({', '.join(bad)} changed since it was saved)")
    try:
        CheckpointReader(path, set(manifest["files"])).read_metadata()
    except ZhiluError as e:
        raise Unusable(e.message.removeprefix(f"{path} ")) from None
    return manifest


def candidates(run_dir: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints to try, newest first, and the problems with the ``latest`` pointer, as lines
    to show. ``latest`` is moved only after its checkpoint is complete, so it may lag behind
    one a crash left complete but unnamed: the newest good checkpoint is used either way."""
    root = run_dir / "checkpoints"
    found = sorted((p for p in root.glob("step-*") if STEP_NAME.fullmatch(p.name) and p.is_dir()
                    and not p.is_symlink()), key=lambda p: p.name, reverse=True)
    _, problem = read_pointer(root)
    return found, [f"{root / 'latest'} {problem}"] if problem else []


def read_pointer(root: Path) -> tuple[str | None, str | None]:
    """The name ``checkpoints/latest`` holds, or why it holds none (None, None: no pointer)."""
    pointer = root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None, None
    if pointer.is_symlink() or not pointer.is_file():
        return None, "is not a plain file"
    try:
        with open(pointer, "rb") as f:
            raw = f.read(101)
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    name = raw.decode("ascii", "replace").strip()
    if not STEP_NAME.fullmatch(name):
        return None, f"holds {raw[:40]!r}{'...' if len(raw) > 40 else ''}, not the name of a checkpoint"
    if (root / name).is_symlink() or not (root / name / "manifest.json").is_file():
        return None, f"names {name}, which is not a complete checkpoint in {root}"
    return name, None


def latest_checkpoint(run_dir: Path, strict: bool = False) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None when there is no valid pointer
    (with ``strict``, a ZhiluError that says why and what is valid)."""
    root = run_dir / "checkpoints"
    name, problem = read_pointer(root)
    if name is not None:
        return root / name
    if problem is not None and strict:
        found = sorted(p.name for p in root.glob("step-*") if not p.is_symlink() and (p / "manifest.json").is_file())
        raise ZhiluError(FIELD, f"{root / 'latest'} {problem}; valid: the name of a checkpoint directory in {root}"
                         + (f" ({', '.join(found)})" if found else ", and there is none"))
    return None


def newest_good(run_dir: Path, say: Callable[[str], None] = print) -> Path | None:
    """This process checks the candidates in order and returns the first good one, saying in
    one line each why a better one was passed over; None when there is no checkpoint at all.
    A ZhiluError when there are checkpoints and none is good."""
    paths, notes = candidates(run_dir)
    rejected = []
    for path in paths:
        try:
            check(path)
        except Unusable as e:
            rejected.append(f"{path.name} {e}")
            continue
        if notes + rejected:
            say(f"zhilu: {'; '.join(notes + rejected)}; using {path.name}")
        return path
    refuse_none_good(run_dir, notes + rejected)
    return None


def refuse_none_good(run_dir: Path, problems: list[str]) -> None:
    if problems:
        raise ZhiluError(FIELD, f"{run_dir} has no good checkpoint ({'; '.join(problems)}); valid: a run directory "
                                "with an intact checkpoint, or start a new run with another --out")


def verify(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest and its ``.metadata`` against the
    allow-list (no code runs). Returns the manifest; a ZhiluError names what is wrong."""
    try:
        return check(path)
    except Unusable as e:
        raise ZhiluError(FIELD, f"{path} {e}; zhilu refuses to load it") from None
