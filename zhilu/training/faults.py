"""Fault injection, for the tests and benchmarks that prove recovery (never set in normal runs).

``ZHILU_FAULTS`` holds faults separated by ``;``, each ``WHAT:key=value:...``::

    kill:rank=1:step=5            rank 1 kills itself with SIGKILL as step 5 begins
    stop:rank=1:step=3            rank 1 stops itself with SIGSTOP (a hung rank)
    nan:rank=1:batch=4            rank 1's loss is NaN on batch 4 (batches count from 0)
    kill:rank=0:save=4:write=2    rank 0 is killed at its 2nd file write of the save at step 4
    fail:rank=0:save=4:write=2    ... that write raises OSError instead
    flip:save=4                   once the save at step 4 is complete, a byte of its data flips
    kill:rank=1:step=5:attempt=1  ... on the job's second attempt (its first restart)
    delay:term=data:ms=40:step=6  rank 0 sleeps 40 ms in each step's data term from step 6 on
                                  (terms: data, optimizer, dp_comm: as each gradient all-reduce
                                  completes; tp_comm: before the step's first tensor-parallel
                                  collective; pipeline: busy before each micro-batch's forward)
    slow:rank=1:percent=30        rank 1 spins for 30% more CPU time in each forward and backward

A fault fires on the job's first attempt only (``attempt=0``; a restarted job runs clean)
unless it names another, and ``rank`` defaults to 0. Steps count from 1 (the step being
computed), batches from 0.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ENV = "ZHILU_FAULTS"
KINDS = ("kill", "stop", "nan", "fail", "flip", "delay", "slow")
KEYS = ("rank", "step", "save", "write", "batch", "attempt", "ms", "percent")
DELAYED = ("data", "optimizer", "dp_comm", "tp_comm", "pipeline")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int = 0
    step: int = 0  # the step being computed (kill, stop, nan)
    save: int = 0  # the step whose save is hit (kill, fail with write)
    write: int = 0  # which file write of that save, from 1
    batch: int = -1  # the batch whose loss is NaN (nan)
    attempt: int = 0  # the attempt it fires on (0: the first)
    term: str = ""  # the term a delay is added to (delay), from step ``step`` on
    ms: int = 0  # milliseconds of delay (delay)
    percent: int = 0  # extra compute, in per cent of the measured (slow)


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r}; valid: {', '.join(KINDS)}")
        values: dict[str, int | str] = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key == "term":
                if value not in DELAYED:
                    raise ValueError(f"{ENV}: term={value!r} in {item!r}; valid: {', '.join(DELAYED)}")
                values[key] = value
                continue
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

    def delay_s(self, term: str, step: int) -> float:
        """Seconds to add to ``term`` in step ``step``."""
        return sum(f.ms for f in self.faults if f.kind == "delay" and f.term == term and step >= f.step) / 1e3

    def sleep(self, term: str, step: int) -> None:
        """Wait out ``term``'s delay: asleep, as on I/O; a pipeline stage busy, as on a slower stage."""
        if not (seconds := self.delay_s(term, step)):
            return
        if term != "pipeline":
            time.sleep(seconds)
            return
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def comm_delay(self, step: Callable[[], int]) -> Callable[[], None] | None:
        """What to call as each gradient all-reduce completes: sleep for the ``dp_comm`` delay of
        step ``step()``; None when no fault delays it."""
        if not any(f.kind == "delay" and f.term == "dp_comm" for f in self.faults):
            return None
        return lambda: self.sleep("dp_comm", step())

    def tp_delay(self, step: Callable[[], int]) -> Callable[[], None] | None:
        """What to call as each tensor-parallel collective is launched: sleep for the ``tp_comm``
        delay of step ``step()`` before the first of that step's; None when no fault delays it."""
        if not any(f.kind == "delay" and f.term == "tp_comm" for f in self.faults):
            return None
        delayed: set[int] = set()

        def before_launch() -> None:
            if (now := step()) not in delayed:
                delayed.add(now)
                self.sleep("tp_comm", now)

        return before_launch

    def delay_stages(self, parts: list[nn.Module], step: Callable[[], int]) -> None:
        """Before each forward of a pipeline stage, wait out the ``pipeline`` delay of step ``step()``."""
        if any(f.kind == "delay" and f.term == "pipeline" for f in self.faults):
            for part in parts:
                part.register_forward_pre_hook(lambda module, args: self.sleep("pipeline", step()))

    def spin(self, seconds: float) -> None:
        """Burn ``percent`` per cent of ``seconds`` more CPU time (a slow rank)."""
        extra = sum(f.percent for f in self.faults if f.kind == "slow") / 100 * seconds
        end = time.thread_time() + extra
        while extra and time.thread_time() < end:
            pass

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
