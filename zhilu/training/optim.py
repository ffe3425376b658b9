"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from zhilu.config import TrainSection

ADAMW_EPS = 1e-8  # added to sqrt(v) in AdamW's denominator


def build_optimizer(model: nn.Module, t: TrainSection, device_type: str) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); weight decay on parameters of 2 or more dimensions only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=ADAMW_EPS, fused=device_type == "cuda"
    )


def lr_at(step: int, t: TrainSection) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The global norm of the gradients of all ``parts``, clipped to ``max_norm`` (0: not
    clipped); returns the norm before clipping (NaN or inf when a gradient is).

    Gradients may be plain tensors or DTensors on different meshes (tensor-parallel weights,
    replicated norms, FSDP shards): each group is normed by PyTorch's ``get_total_norm`` and
    made whole, and pipeline stages add their squares over ``pp_group``.
    """
    groups: dict[object, list[nn.Parameter]] = {}  # parameters whose gradients share a layout
    for part in parts:
        for p in part.parameters():
            if p.grad is not None:
                key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
                groups.setdefault(key, []).append(p)
    squares = torch.zeros((), dtype=torch.float32, device=next(parts[0].parameters()).device)
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        squares += (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
