"""What a rank holds in memory: parameters, gradients, optimizer states and the peak."""

from __future__ import annotations

import resource
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

KEYS = ("params", "grads", "optimizer", "peak")


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the local parts of ``tensors`` (a DTensor counts its local shard; None counts 0)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory on a GPU; the peak resident set of this process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_per_rank(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], grad_bytes: int,
                    device: torch.device) -> list[dict[str, float]]:
    """MiB of each kind held by every rank (collective when there is a process group)."""
    held = torch.tensor([
        tensor_bytes(p for part in parts for p in part.parameters()),
        grad_bytes,
        tensor_bytes(v for opt in optimizers for state in opt.state.values() for v in state.values()),
        peak_memory_gib(device) * 2**30,
    ], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")  # NCCL gathers GPU tensors
    rows = [held]
    if dist.is_initialized():
        rows = [torch.zeros_like(held) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, held)
    return [dict(zip(KEYS, (v / 2**20 for v in row.tolist()))) for row in rows]
