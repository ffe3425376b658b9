"""Pipeline parallelism on the mesh's "pp" dimension through ``torch.distributed.pipelining``.

The model declares the units a pipeline can split between (embedding, each block, final
norm and output). Stages get contiguous layers, balanced with the embedding and the
norm + output each counted as one more layer, and every stage holds at least one layer.
Each rank builds its stages from a meta-device model, so it materialises only its own
layers. With the interleaved schedule a rank holds ``vstages`` stages, placed round-robin
(rank r holds stages r, r + pp, r + 2 pp, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from zhilu.models.gpt import GPT
from zhilu.models.presets import GPTConfig
from zhilu.parallel.mesh import ParallelEnv
from zhilu.parallel.tensor_parallel import whole
from zhilu.plan import Plan


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Layer indices of each stage: n_layers + 2 units (embedding, layers, head) spread evenly."""
    bounds = [0]
    for k in range(1, n_stages):
        bounds.append(min(max(round(k * (n_layers + 2) / n_stages) - 1, k), n_layers - (n_stages - k)))
    bounds.append(n_layers)
    return [range(bounds[k], bounds[k + 1]) for k in range(n_stages)]


def build_stage(cfg: GPTConfig, layers: range, first: bool, last: bool, device: torch.device, seed: int) -> GPT:
    """The part of the model that one stage runs, materialised on ``device`` alone."""
    with torch.device("meta"):
        stage = GPT(cfg)
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    for name in [n for n in stage.layers if int(n) not in layers]:
        del stage.layers[name]
    stage.to_empty(device=device)
    stage.init_weights(seed)
    return stage


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, cfg: GPTConfig, plan: Plan, env: ParallelEnv, seed: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 parallelize: Callable[[nn.Module], nn.Module]) -> None:
        n_stages = plan.pp * plan.stages_per_rank
        pp_rank = env.local_rank_in("pp")
        ranges = stage_layers(cfg.n_layers, n_stages)
        self.stage_ids = [pp_rank + k * plan.pp for k in range(plan.stages_per_rank)]
        self.parts = [
            parallelize(build_stage(cfg, ranges[i], i == 0, i == n_stages - 1, env.device, seed))
            for i in self.stage_ids
        ]
        group = env.group("pp")
        stages = [PipelineStage(part, i, n_stages, env.device, group=group) for part, i in zip(self.parts, self.stage_ids)]
        self.has_first = 0 in self.stage_ids
        self.has_last = n_stages - 1 in self.stage_ids
        if plan.schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=plan.mb, loss_fn=loss_fn)
        else:
            kind = ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B
            self.schedule = kind(stages[0], n_microbatches=plan.mb, loss_fn=loss_fn)

    def _run(self, method: Callable[..., object], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        if self.has_last:
            method(*args, target=targets, losses=losses)
            return torch.stack([whole(loss.detach()) for loss in losses]).mean()
        method(*args)
        return None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of all micro-batches; the mean loss on the last stage's rank."""
        return self._run(self.schedule.step, inputs, targets)

    def eval(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward only; the mean loss on the last stage's rank."""
        return self._run(self.schedule.eval, inputs, targets)

