"""Where a step's time goes, measured on every rank in the performance model's terms.

Each rank times its own steps with wall clocks:

* ``data``: drawing the batch;
* ``forward``: the forward passes and the loss;
* ``backward``: the backward passes. Under DDP each gradient bucket's all-reduce is launched
  as the bucket fills and runs beside the rest of the backward; what the backward still
  waits for after its last bucket is launched is
* ``dp_comm_exposed``: data-parallel communication nothing hid;
* ``pipeline``: under pipeline parallelism the whole schedule (forward, backward, transfers
  and bubble together);
* ``optimizer``: gradient clipping and the optimizer step;
* ``other``: the rest of the step time (the agreement of all ranks on a bad step, logging).

The step time of an interval is its wall time over the steps in it, and ``other`` is what
the other terms leave of it, so the terms sum to the step time: on every rank, and in the
aggregate (each term's median over the ranks; ``other`` what they leave of rank 0's step).
Tensor-parallel traffic, FSDP's gathers and scatters and recomputation run inside ``forward``
and ``backward``.

Every logged step the ranks exchange their per-step means over the interval (one small
all-gather), so rank 0 knows each rank's terms. A rank's own compute is the CPU time of its
training thread in ``forward``, ``backward`` and ``pipeline`` (the thread that runs the
operators and takes its share of their intra-op work): waiting in a collective costs no CPU
time, so the wait that gives every rank the same backward wall time does not hide a slow
rank. A rank whose own compute per step, over the latest logged intervals that cover
:data:`STRAGGLER_STEPS` steps (the first step left out), is at least :data:`STRAGGLER_RATIO`
times the median of the other ranks' is named the straggler.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

TERMS = ("data", "forward", "backward", "dp_comm_exposed", "pipeline", "optimizer", "other")
COMPUTE = ("forward", "backward", "pipeline")
STRAGGLER_RATIO = 1.15  # above the spread of an even run on a shared 2-core machine, below a 30% slow rank
STRAGGLER_STEPS = 10
BY_RANK_MAX = 64  # every rank's terms go into metrics.jsonl up to this many ranks


class StepClock:
    """Per-term wall time of this rank's steps since the last logged one."""

    def __init__(self, world_size: int, names_stragglers: bool = True) -> None:
        self.world_size = world_size
        self.names_stragglers = names_stragglers  # not on CUDA: a thread's CPU time is not a GPU's compute
        self.last_bucket: float | None = None  # when the last gradient bucket's all-reduce was launched
        self._step = dict.fromkeys(TERMS, 0.0)
        self._step_cpu = 0.0
        self._warm = False
        self._window: list[tuple[int, list[float]]] = []  # (steps, compute per rank) of recent intervals
        self.straggler: int | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new interval now (after a dropped step, a save, a logged step)."""
        self._sums = dict.fromkeys(TERMS, 0.0)
        self._cpu = 0.0
        self._steps = 0
        self._start = time.perf_counter()

    def start_step(self) -> None:
        self._step = dict.fromkeys(TERMS, 0.0)
        self._step_cpu = 0.0

    @contextmanager
    def term(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self._step[name] += time.perf_counter() - start
            if name in COMPUTE:
                self._step_cpu += time.thread_time() - cpu

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Time a backward pass, splitting off what it waits for after its last bucket's all-reduce."""
        self.last_bucket = None
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            end = time.perf_counter()
            launched = self.last_bucket if self.last_bucket is not None and self.last_bucket >= start else end
            self._step["backward"] += launched - start
            self._step["dp_comm_exposed"] += end - launched
            self._step_cpu += time.thread_time() - cpu

    def bucket_launched(self) -> None:
        self.last_bucket = time.perf_counter()

    def end_step(self) -> None:
        """Count the step begun by :meth:`start_step` (a dropped step is followed by :meth:`reset` instead)."""
        for k, v in self._step.items():
            self._sums[k] += v
        self._cpu += self._step_cpu
        self._steps += 1

    def collect(self, device: torch.device) -> dict[str, Any] | None:
        """Every rank's per-step means over the interval, aggregated (collective: every rank
        calls it at the same logged steps); starts a new interval. None when no step was counted.
        The first interval (with the first step's warm-up) does not count toward naming a straggler."""
        elapsed = time.perf_counter() - self._start
        steps = max(self._steps, 1)
        means = [self._sums[k] / steps for k in TERMS]
        step_time = elapsed / steps
        means[TERMS.index("other")] = max(0.0, step_time - sum(means))
        mine = torch.tensor(means + [step_time, self._cpu / steps, float(self._steps)], dtype=torch.float64,
                            device=device if device.type == "cuda" else "cpu")  # NCCL gathers GPU tensors
        rows = [mine]
        if self.world_size > 1:
            rows = [torch.zeros_like(mine) for _ in range(self.world_size)]
            dist.all_gather(rows, mine)
        self.reset()
        counted = int(rows[0][-1])
        if not counted:
            return None
        per_rank = [dict(zip(TERMS, row.tolist())) for row in rows]
        compute = [float(row[-2]) for row in rows]
        if self._warm and self.names_stragglers:
            self._update_straggler(compute, counted)
        self._warm = True
        present = [k for k in TERMS if any(r[k] for r in per_rank) or k in ("data", "optimizer", "other")]
        breakdown = {k: statistics.median(r[k] for r in per_rank) for k in present}
        breakdown["other"] = max(0.0, step_time - sum(v for k, v in breakdown.items() if k != "other"))
        return {
            "step_time_s": step_time,
            "breakdown": breakdown,
            "breakdown_min": {k: min(r[k] for r in per_rank) for k in present},
            "breakdown_max": {k: max(r[k] for r in per_rank) for k in present},
            "compute_s_by_rank": compute,
            **({"breakdown_by_rank": [{k: r[k] for k in present} for r in per_rank]}
               if len(per_rank) <= BY_RANK_MAX else {}),
            "slowest_rank": max(range(len(compute)), key=compute.__getitem__),
            "straggler": self.straggler,
        }

    def _update_straggler(self, compute: list[float], steps: int) -> None:
        if len(compute) < 2:
            return
        self._window.append((steps, compute))
        while sum(n for n, _ in self._window[1:]) >= STRAGGLER_STEPS:
            self._window.pop(0)
        covered = sum(n for n, _ in self._window)
        means = [sum(n * c[r] for n, c in self._window) / covered for r in range(len(compute))]
        slowest = max(range(len(means)), key=means.__getitem__)
        others = statistics.median(means[:slowest] + means[slowest + 1:])
        named = covered >= STRAGGLER_STEPS and others > 0 and means[slowest] >= STRAGGLER_RATIO * others
        self.straggler = slowest if named else None
