"""Applying a Plan to the model, in one fixed order.

For each part of the model this rank runs (the whole model, or its pipeline stages):
tensor parallelism -> activation recomputation -> torch.compile per block -> data
parallelism (DDP / FSDP2). Pipeline stages are cut first, from a meta-device model, and the
schedule is built over the finished parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zhilu.models.gpt import build_model, loss_fn
from zhilu.models.presets import GPTConfig
from zhilu.parallel.data_parallel import apply_data_parallel
from zhilu.parallel.mesh import ParallelEnv
from zhilu.parallel.pipeline_parallel import Pipeline
from zhilu.parallel.recompute import apply_recompute
from zhilu.parallel.tensor_parallel import apply_tensor_parallel
from zhilu.plan import Plan


@dataclass
class ParallelModel:
    parts: list[nn.Module]  # what this rank holds: one module, or its pipeline stages
    pipeline: Pipeline | None


def parallelize(model_cfg: GPTConfig, plan: Plan, env: ParallelEnv, seed: int, compile: bool) -> ParallelModel:
    def wrap(part: nn.Module) -> nn.Module:
        if plan.tp > 1:
            apply_tensor_parallel(part, env.mesh["tp"], plan.sp)  # type: ignore[index]
        apply_recompute(part, plan.recompute)
        if compile:
            for block in part.layers.values():
                block.compile()
        return apply_data_parallel(part, plan, env)

    if plan.pp > 1:
        pipeline = Pipeline(model_cfg, plan, env, seed, loss_fn, wrap)
        return ParallelModel(pipeline.parts, pipeline)
    return ParallelModel([wrap(build_model(model_cfg, env.device, seed))], None)
