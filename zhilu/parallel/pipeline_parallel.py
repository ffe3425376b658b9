"""Pipeline parallelism on the mesh's "pp" dimension through ``torch.distributed.pipelining``.

The model declares its blocks and the modules before and after them
(:class:`zhilu.spec.PipelineSplit`). Stages get contiguous blocks as
:func:`zhilu.plan.stage_layers` splits them (the one split the performance model uses too);
the first stage also holds the modules before the blocks, the last those after. Each rank
builds its stages from a meta-device model, so it materialises only its own layers. With the
interleaved schedule a rank holds ``vstages`` stages, placed round-robin (rank r holds
stages r, r + pp, r + 2 pp, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from zhilu.parallel.mesh import ParallelEnv
from zhilu.parallel.tensor_parallel import whole
from zhilu.plan import Plan, stage_ids, stage_layers
from zhilu.spec import ModelSpec


def build_stage(spec: ModelSpec, layers: range, first: bool, last: bool, device: torch.device, seed: int) -> nn.Module:
    """The part of the model that one stage runs, materialised on ``device`` alone."""
    assert spec.pipeline is not None
    with torch.device("meta"):
        stage = spec.build()
    dropped = ([] if first else list(spec.pipeline.first)) + ([] if last else list(spec.pipeline.last))
    for name in dropped:
        parent, _, attr = name.rpartition(".")
        setattr(stage.get_submodule(parent), attr, None)
    blocks = spec.blocks_of(stage)
    for key in [k for i, k in enumerate(list(blocks.keys())) if i not in layers]:
        del blocks[key]
    stage.to_empty(device=device)
    spec.init_weights(stage, seed)
    return stage


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, spec: ModelSpec, plan: Plan, env: ParallelEnv, seed: int,
                 parallelize: Callable[[nn.Module], nn.Module]) -> None:
        n_stages = plan.pp * plan.stages_per_rank
        pp_rank = env.local_rank_in("pp")
        with torch.device("meta"):
            n_blocks = len(spec.blocks_of(spec.build()))
        ranges = stage_layers(n_blocks, n_stages)
        self.stage_ids = stage_ids(plan.pp, plan.stages_per_rank, pp_rank)
        self.parts = [
            parallelize(build_stage(spec, ranges[i], i == 0, i == n_stages - 1, env.device, seed))
            for i in self.stage_ids
        ]
        group = env.group("pp")
        self.stages = stages = [PipelineStage(part, i, n_stages, env.device, group=group)
                                for part, i in zip(self.parts, self.stage_ids)]
        self.has_first = 0 in self.stage_ids
        self.has_last = n_stages - 1 in self.stage_ids
        if plan.schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=plan.mb, loss_fn=spec.loss)
        else:
            kind = ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B
            self.schedule = kind(stages[0], n_microbatches=plan.mb, loss_fn=spec.loss)

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
