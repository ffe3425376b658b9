"""Where a step's time goes, measured on every rank in the performance model's terms.

Each rank times its own steps with wall clocks:

* ``data``: drawing the batch;
* ``forward``: the forward passes and the loss;
* ``backward``: the backward passes, less the two terms below;
* ``recompute``: the blocks' forward that activation recomputation runs again inside the
  backward (timed by hooks on the blocks the checkpoint wrappers hold);
* ``tp_comm``: under tensor parallelism on CPU, the time the forward and backward spend in the
  tensor-parallel group's collectives and waiting for their results
  (:mod:`zhilu.monitor.tp_traffic`); elsewhere that traffic stays inside ``forward`` and
  ``backward``;
* ``dp_comm_exposed``: under DDP each gradient bucket's all-reduce is launched as the bucket
  fills and runs beside the rest of the backward; this is what the backward still waits for
  after its last bucket is launched, the data-parallel communication nothing hid;
* ``pipeline``: under pipeline parallelism, what the schedule spends outside its stages'
  forward and backward chunks (which count as ``forward`` and ``backward``): waiting for the
  other stages (the bubble) and for transfers nothing hid, and the loss;
* ``optimizer``: gradient clipping and the optimizer step;
* ``other``: the rest of the step time (the agreement of all ranks on a bad step, logging).

The step time of an interval is its wall time over the steps in it, and ``other`` is what
the other terms leave of it, so the terms sum to the step time: on every rank, and in the
aggregate (each term's mean over the ranks, which sums to the mean of the ranks' step times,
the job's step time), with each term's min, median and max beside it.
FSDP's gathers and scatters run inside ``forward`` and ``backward``.

Every logged step the ranks exchange their per-step means over the interval (one small
all-gather), so rank 0 knows each rank's terms. A rank's own compute is the CPU time of its
training thread in ``forward``, ``backward`` and ``pipeline`` (the thread that runs the
operators and takes its share of their intra-op work): waiting in a collective costs no CPU
time, so the wait that gives every rank the same backward wall time does not hide a slow
rank. A rank whose own compute per step is at least :data:`STRAGGLER_RATIO` times the median
of the other ranks' in every one of the latest logged intervals that cover
:data:`STRAGGLER_STEPS` steps is named the straggler; the first :data:`STRAGGLER_STEPS`
steps (lazy initialisation, the allocator's and caches' warm-up, rank 0's start-up work) are
not judged.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zhilu.monitor.tp_traffic import TensorParallelTraffic

TERMS = ("data", "forward", "backward", "recompute", "tp_comm", "dp_comm_exposed", "pipeline", "optimizer", "other")
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
        self._tp_at_bucket = 0.0  # tensor-parallel seconds timed by then
        self._traffic: TensorParallelTraffic | None = None
        self._in_backward = False
        self._recomputed = 0.0  # seconds of recomputation in the current backward
        self._step = dict.fromkeys(TERMS, 0.0)
        self._step_cpu = 0.0
        self._counted = 0  # steps in the intervals collected so far
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

    def watch_tensor_parallel(self, group_name: str, before_launch: Any = None) -> None:
        """Time the collectives of the tensor-parallel group ``group_name`` as ``tp_comm`` (CPU
        only; ``before_launch``: called as each is launched, see :class:`TensorParallelTraffic`)."""
        self._traffic = TensorParallelTraffic(group_name, before_launch)

    def _tp(self) -> float:
        return self._traffic.seconds if self._traffic is not None else 0.0

    @contextmanager
    def _watching(self) -> Iterator[None]:
        with self._traffic if self._traffic is not None else contextlib.nullcontext():
            yield

    @contextmanager
    def term(self, name: str) -> Iterator[None]:
        """Time a term; for ``pipeline``, less the stages' chunks timed inside it (:meth:`watch_stages`);
        for the compute terms, less the tensor-parallel traffic inside them."""
        start, cpu, tp = time.perf_counter(), time.thread_time(), self._tp()
        chunks = self._step["forward"] + self._step["backward"]
        try:
            with self._watching() if name in COMPUTE else contextlib.nullcontext():
                yield
        finally:
            traffic = self._tp() - tp
            inside = self._step["forward"] + self._step["backward"] - chunks if name == "pipeline" else 0.0
            self._step[name] += time.perf_counter() - start - inside - traffic
            self._step["tp_comm"] += traffic
            if name in COMPUTE:
                self._step_cpu += time.thread_time() - cpu

    def watch_stages(self, stages: list[Any]) -> None:
        """Time each pipeline stage's forward and backward chunks (``torch.distributed.pipelining``
        stages: the schedule calls their ``forward_one_chunk`` and ``backward_one_chunk``)."""
        for stage in stages:
            for method, name in (("forward_one_chunk", "forward"), ("backward_one_chunk", "backward")):
                setattr(stage, method, self._timed(getattr(stage, method), name))

    def _timed(self, run: Any, name: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, tp = time.perf_counter(), self._tp()
            try:
                return run(*args, **kwargs)
            finally:  # the traffic inside is counted by the pipeline term that holds the chunk
                self._step[name] += time.perf_counter() - start - (self._tp() - tp)

        return timed

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Time a backward pass, splitting off what it waits for after its last bucket's all-reduce."""
        self.last_bucket = None
        self._in_backward, self._recomputed = True, 0.0
        start, cpu, tp = time.perf_counter(), time.thread_time(), self._tp()
        try:
            with self._watching():
                yield
        finally:
            end, tp_end = time.perf_counter(), self._tp()
            self._in_backward = False
            launched, tp_launched = ((self.last_bucket, self._tp_at_bucket)
                                     if self.last_bucket is not None and self.last_bucket >= start else (end, tp_end))
            self._step["recompute"] += self._recomputed  # a block is rebuilt before its gradients go out
            self._step["backward"] += max(0.0, launched - start - self._recomputed - (tp_launched - tp))
            self._step["dp_comm_exposed"] += max(0.0, end - launched - (tp_end - tp_launched))
            self._step["tp_comm"] += tp_end - tp
            self._step_cpu += time.thread_time() - cpu

    def watch_recompute(self, model: nn.Module) -> None:
        """Time, as ``recompute``, every forward of a block that a checkpoint wrapper in ``model``
        runs during the backward."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        started: list[tuple[float, float]] = []

        def before(module: nn.Module, args: Any) -> None:
            if self._in_backward:
                started.append((time.perf_counter(), self._tp()))

        def after(module: nn.Module, args: Any, output: Any) -> None:
            if self._in_backward and started:
                start, tp = started.pop()
                self._recomputed += time.perf_counter() - start - (self._tp() - tp)

        for wrapper in model.modules():
            if isinstance(wrapper, CheckpointWrapper):
                wrapper._checkpoint_wrapped_module.register_forward_pre_hook(before)
                # always_call: recomputation stops the block's forward early (an exception) once
                # it has rebuilt what the backward needs
                wrapper._checkpoint_wrapped_module.register_forward_hook(after, always_call=True)

    def bucket_launched(self) -> None:
        self.last_bucket, self._tp_at_bucket = time.perf_counter(), self._tp()

    def end_step(self) -> None:
        """Count the step begun by :meth:`start_step` (a dropped step is followed by :meth:`reset` instead)."""
        for k, v in self._step.items():
            self._sums[k] += v
        self._cpu += self._step_cpu
        self._steps += 1

    def collect(self, device: torch.device) -> dict[str, Any] | None:
        """Every rank's per-step means over the interval, aggregated (collective: every rank
        calls it at the same logged steps); starts a new interval. None when no step was counted.
        The intervals that start in the first :data:`STRAGGLER_STEPS` steps do not count toward
        naming a straggler."""
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
        if self._counted >= STRAGGLER_STEPS and self.names_stragglers:  # the start-up steps are not judged
            self._update_straggler(compute, counted)
        self._counted += counted
        present = [k for k in TERMS if any(r[k] for r in per_rank) or k in ("data", "optimizer", "other")]
        # the ranks' intervals start and end at slightly different moments (a save, the first
        # step): the job's step time is their mean, which each rank's terms sum to on average
        step_time = statistics.fmean(float(row[-3]) for row in rows)
        breakdown = {k: statistics.fmean(r[k] for r in per_rank) for k in present}
        return {
            "step_time_s": step_time,
            "breakdown": breakdown,
            "breakdown_min": {k: min(r[k] for r in per_rank) for k in present},
            "breakdown_median": {k: statistics.median(r[k] for r in per_rank) for k in present},
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
        # slower in every interval, not on average: one interval's jitter (a page-fault burst,
        # softirq time charged to the thread) must not name a rank
        ratios = [c[slowest] / others if (others := statistics.median(c[:slowest] + c[slowest + 1:])) > 0 else 0.0
                  for _, c in self._window]
        named = covered >= STRAGGLER_STEPS and min(ratios) >= STRAGGLER_RATIO
        self.straggler = slowest if named else None
