"""Timing on every process at once: the median of repeats, agreed over the process group."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

_PASSES = 3


def _timer(device: Any) -> Callable[[Callable[[], Any], float], float]:
    """Median seconds per call of ``fn``, over repeats filling about ``budget`` seconds."""
    import torch
    import torch.distributed as dist

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Callable[[], Any], budget: float = 0.1) -> float:
        if dist.is_initialized():
            dist.barrier()  # every process measures at the same time
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - start, 1e-7)
        if dist.is_initialized():  # the same repeats everywhere, or collectives would not pair up
            once = _agreed(once)
        reps = max(1, min(50, int(budget / 5 / once)))
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            samples.append((time.perf_counter() - start) / reps)
        return statistics.median(samples)

    return timed


def _agreed(seconds: float) -> float:
    """The slowest process's time: a collective ends when its last member is done."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
