"""The device's measured matrix-multiply rate (benchmarks compare model FLOP/s with it; MFU is zhilu/mfu.py)."""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Dense ``size`` x ``size`` matmul FLOP/s this process achieves on ``device`` (best of a few runs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2.0 * size**3
    best = 0.0
    end = time.perf_counter() + seconds
    a @ b  # warm up
    while time.perf_counter() < end:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * flops / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
