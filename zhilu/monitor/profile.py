"""One step under the PyTorch profiler on every rank: a trace for Perfetto or chrome://tracing.

    zhilu train --metrics.profile_step 10        # <run>/profile/step-10-rank-R.json

The trace is torch.profiler's own export: every operator with its input shapes, the
collectives (gloo or NCCL) and, on CUDA, the kernels on each stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def profiled(step: int, wanted: int, run_dir: Path, rank: int, device_type: str) -> Iterator[None]:
    """Profile what runs inside when ``step`` is the ``wanted`` one (0: never)."""
    if step != wanted:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    out = run_dir / "profile"
    out.mkdir(exist_ok=True)
    path = out / f"step-{step}-rank-{rank}.json"
    tmp = path.with_name(path.name + ".tmp")
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, path)
