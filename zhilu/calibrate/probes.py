"""What each process measures: products, attention, bandwidth, launch time and collectives.

Every process of the job measures at the same time (:func:`measure`), as they run when training.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zhilu.calibrate.runtime import _measure_fsdp, _measure_tensor_parallel
from zhilu.calibrate.shapes import (_CPU_ATTENTION, _CPU_LAYERS, _CPU_SIZES, _GPU_ATTENTION, _GPU_LAYERS,
                                    _GPU_SIZES)
from zhilu.calibrate.timing import _PASSES, _agreed, _timer
from zhilu.perf.comm import COLLECTIVES
from zhilu.perf.presets import PRESETS


def measure(device_type: str) -> dict[str, Any]:
    """What one process measures (every process of the job at once); a plain dict, no tensors."""
    import torch.distributed as dist

    from zhilu.parallel.mesh import join_group

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = join_group(device_type)
    try:
        out = _measure_device(device)
        out["comm"] = _measure_comm(device) if world > 1 else []
        out["tensor_parallel"] = _measure_tensor_parallel(device) if world % 2 == 0 else None
        out["fsdp"] = _measure_fsdp(device) if world > 1 else None
        return out
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _measure_device(device: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    timed = _timer(device)
    gpu = device.type == "cuda"
    train_dtype = torch.bfloat16 if gpu else torch.float32
    probes: list[tuple[dict[str, Any], Callable[[], Any], float]] = []  # (record, call, FLOPs of a call)
    for dtype in (torch.float32, torch.bfloat16):
        shapes = _GPU_LAYERS if gpu else _CPU_LAYERS
        for tokens, n, k in (shapes if dtype == train_dtype else shapes[-1:]):
            for (m_, n_, k_), call, flops in _products(device, dtype, tokens, n, k):
                record = {"precision": "bf16" if dtype == torch.bfloat16 else "fp32", "m": m_, "n": n_, "k": k_}
                probes.append((record, call, flops))
    n_products = len(probes)
    for s, d in _GPU_ATTENTION if gpu else _CPU_ATTENTION:
        heads = max(1, (2 ** 26 if gpu else 2 ** 19) // (s * d))
        q, k, v = (torch.randn(1, heads, s, d, device=device, dtype=train_dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, heads, s, d, device=device, dtype=train_dtype)

        def step(q=q, k=k, v=v, grad=grad) -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        probes.append(({"precision": "bf16" if gpu else "fp32", "seq_len": s, "head_dim": d}, step,
                       0.5 * 3.5 * 4 * heads * s * s * d))
    # Machine noise comes in bursts: every probe is timed in each of several passes, and the
    # median of its passes kept.
    samples: list[list[float]] = [[] for _ in probes]
    for _ in range(_PASSES):
        for i, (_, call, _) in enumerate(probes):
            samples[i].append(timed(call, 0.03))
    for (record, _, flops), times in zip(probes, samples):
        record["tflops"] = flops / statistics.median(times) / 1e12
    # an elementwise product of activation-sized tensors: reads two, writes one
    nbytes = 2 ** 28 if gpu else 2 ** 24
    a, b, c = (torch.ones(nbytes // 4, device=device) for _ in range(3))
    bandwidth = 3 * nbytes / timed(lambda: torch.mul(a, b, out=c)) / 1e9
    # the host time of one small op under autograd, forward and backward (what eager training pays per op)
    x = torch.ones(8, device=device, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(50):
            y = y * 1.0001
        y.sum().backward()

    launch_us = timed(chain) / 101 * 1e6
    return {"matmul": [p[0] for p in probes[:n_products]], "attention": [p[0] for p in probes[n_products:]],
            "bandwidth_gbps": bandwidth, "launch_us": launch_us,
            "name": torch.cuda.get_device_name(device) if gpu else _cpu_name(),
            "memory_gib": torch.cuda.mem_get_info(device)[1] / 2 ** 30 if gpu else _ram_gib(),
            "compute_units": torch.cuda.get_device_properties(device).multi_processor_count if gpu else 1}


Probe = tuple[tuple[int, int, int], Callable[[], Any], float]


def _products(device: Any, dtype: Any, tokens: int, n: int, k: int) -> list[Probe]:
    """One weight's forward, input-gradient and weight-gradient products, as ``((m, n, k), call,
    FLOPs)`` of ``[m, k] x [k, n]``. Operands rotate through several copies, so they come from
    memory as in training, not from a cache warmed by the repeats."""
    import torch
    import torch.nn.functional as F

    copies = 2 if device.type == "cuda" else 4
    x = [torch.randn(tokens, k, device=device, dtype=dtype) for _ in range(copies)]
    w = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
    g = [torch.randn(tokens, n, device=device, dtype=dtype) for _ in range(copies)]
    turn = [0]

    def rotating(op: Callable[[int], Any]) -> Callable[[], Any]:
        def call() -> Any:
            turn[0] = (turn[0] + 1) % copies
            return op(turn[0])
        return call

    flops = 2.0 * tokens * n * k
    forms = (((tokens, n, k), lambda i: F.linear(x[i], w[i])),  # y = x w^T
             ((tokens, k, n), lambda i: g[i] @ w[i]),  # dx = dy w
             ((n, k, tokens), lambda i: g[i].t() @ x[i]))  # dw = dy^T x
    return [(shape, rotating(op), flops) for shape, op in forms]


def _measure_comm(device: Any) -> list[dict[str, Any]]:
    """Seconds of each collective and of a one-way send across sizes (every process takes part)."""
    import torch
    import torch.distributed as dist

    timed = _timer(device)
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for nbytes in _GPU_SIZES if device.type == "cuda" else _CPU_SIZES:
        full = torch.ones(nbytes // 4, device=device)
        shard = torch.ones(nbytes // 4 // n, device=device)
        ops = {"all_reduce": lambda: dist.all_reduce(full),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full),
               "all_gather": lambda: dist.all_gather_into_tensor(full, shard)}
        assert set(ops) == set(COLLECTIVES)
        for kind, op in ops.items():
            rows.append({"kind": kind, "bytes": nbytes, "seconds": _agreed(timed(op, 0.05))})

        def ping_pong() -> None:  # ranks 0 and 1; the others wait
            if rank == 0:
                dist.send(full, 1)
                dist.recv(full, 1)
            elif rank == 1:
                dist.recv(full, 0)
                dist.send(full, 0)

        rows.append({"kind": "p2p", "bytes": nbytes, "seconds": _agreed(timed(ping_pong, 0.05)) / 2})
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return PRESETS["cpu"].device.memory_gib
