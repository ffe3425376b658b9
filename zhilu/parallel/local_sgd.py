"""Model averaging (local SGD): replicas train alone and average their parameters every H steps.

Each data-parallel replica runs its own optimizer on its own shard of the batch, with no
gradient communication; every ``avg_every`` steps the parameters (and, with
``parallel.average_optimizer_state``, the optimizer's moment estimates) are averaged over
the dp dimension with PyTorch's ``model_averaging.utils.average_parameters``.

What H = 1 equals: with plain SGD, averaging the parameters after every step from a common
start gives w - lr * mean(g_i), exactly data-parallel SGD. With AdamW it does not: each
replica normalises its own gradient by its own second-moment estimate, and the mean of those
updates is not Adam's update for the mean gradient (averaging the moments too does not
restore it, since mean(g_i^2) != mean(g_i)^2). Larger H trades that fidelity for H times
fewer synchronisations, which makes it the cheapest plan on slow networks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters


class ModelAveraging:
    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], every: int,
                 group: dist.ProcessGroup | None, average_optimizer_state: bool) -> None:
        self.parts, self.optimizers = parts, optimizers
        self.every, self.group = every, group
        self.average_optimizer_state = average_optimizer_state

    def after_step(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based); averages when it is a multiple of H."""
        if self.group is None or step % self.every:
            return
        average_parameters((p for part in self.parts for p in part.parameters()), self.group)
        if self.average_optimizer_state:
            moments = (v for opt in self.optimizers for state in opt.state.values()
                       for k, v in state.items() if k != "step")
            average_parameters(moments, self.group)  # type: ignore[arg-type]
