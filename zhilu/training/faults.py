"""Fault injection, for the tests and benchmarks that prove recovery (never set in normal runs).

``ZHILU_FAULTS`` holds faults separated by ``;``, each ``WHAT:key=value:...``::

    kill:rank=1:step=5            rank 1 kills itself with SIGKILL as step 5 begins
    stop:rank=1:step=3            rank 1 stops itself with SIGSTOP (a hung rank)
    nan:rank=1:batch=4            rank 1's loss is NaN on batch 4 (batches count from 0)
    kill:rank=0:save=4:write=2    rank 0 is killed at its 2nd file write of the save at step 4
    fail:rank=0:save=4:write=2    ... that write raises OSError instead
    flip:save=4                   once the save at step 4 is complete, a byte of its data flips
    kill:rank=1:step=5:attempt=1  ... on the job's second attempt (its first restart)

A fault fires on the job's first attempt only (``attempt=0``; a restarted job runs clean)
unless it names another, and ``rank`` defaults to 0. Steps count from 1 (the step being
computed), batches from 0.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV = "ZHILU_FAULTS"
KINDS = ("kill", "stop", "nan", "fail", "flip")
KEYS = ("rank", "step", "save", "write", "batch", "attempt")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int = 0
    step: int = 0  # the step being computed (kill, stop, nan)
    save: int = 0  # the step whose save is hit (kill, fail with write)
    write: int = 0  # which file write of that save, from 1
    batch: int = -1  # the batch whose loss is NaN (nan)
    attempt: int = 0  # the attempt it fires on (0: the first)


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r}; valid: {', '.join(KINDS)}")
        values = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in KEYS or not value.isdigit():
                raise ValueError(f"{ENV}: {pair!r} in {item!r}; valid: {', '.join(k + '=N' for k in KEYS)}")
            values[key] = int(value)
        faults.append(Fault(kind, **values))
    return faults


class Faults:
    """The faults meant for this rank on this attempt."""

    def __init__(self, rank: int, attempt: int) -> None:
        self.faults = [f for f in parse(os.environ.get(ENV, "")) if f.rank == rank and f.attempt == attempt]
        self.saving, self.writes = 0, 0

    def at_step(self, step: int) -> None:
        """Called as step ``step`` begins: kill or stop this process if a fault says so."""
        for f in self.faults:
            if f.step == step and not f.save and f.kind in ("kill", "stop"):
                os.kill(os.getpid(), signal.SIGKILL if f.kind == "kill" else signal.SIGSTOP)

    def nan_at(self, batch: int) -> bool:
        return any(f.kind == "nan" and f.batch == batch for f in self.faults)

    def begin_save(self, step: int) -> None:
        self.saving, self.writes = step, 0

    def after_save(self, step: int, path: Path) -> None:
        """Called on rank 0 once the checkpoint of ``step`` is complete."""
        if any(f.kind == "flip" and f.save == step for f in self.faults):
            data = sorted(path.glob("*.distcp"))[0]
            with open(data, "r+b") as f:
                f.seek(data.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))

    def on_write(self) -> None:
        """Called before each file a save writes."""
        if not self.saving:
            return
        self.writes += 1
        for f in self.faults:
            if f.save == self.saving and f.write == self.writes:
                if f.kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if f.kind == "fail":
                    raise OSError(f"{ENV}: write {self.writes} of the save at step {self.saving} failed")


NONE = Faults(0, -1)  # no faults (no attempt is numbered -1)
