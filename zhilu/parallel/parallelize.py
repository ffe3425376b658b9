"""Applying a Plan to a model, in one fixed order.

For each part of the model this rank runs (the whole model, or its pipeline stages):
tensor parallelism -> activation recomputation -> torch.compile per block -> data
parallelism (DDP / FSDP2). Pipeline stages are cut first, from a meta-device model, and the
schedule is built over the finished parts. What is applied is what the model's spec
declares; this package imports no model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zhilu.parallel.data_parallel import apply_data_parallel
from zhilu.parallel.mesh import ParallelEnv
from zhilu.parallel.pipeline_parallel import Pipeline
from zhilu.parallel.recompute import apply_recompute
from zhilu.parallel.tensor_parallel import apply_tensor_parallel
from zhilu.plan import Plan
from zhilu.spec import ModelSpec


@dataclass
class ParallelModel:
    parts: list[nn.Module]  # what this rank holds: one module, or its pipeline stages
    pipeline: Pipeline | None
    sharded_logits: bool  # the loss must run under loss_parallel


def parallelize(model: nn.Module, spec: ModelSpec, plan: Plan, env: ParallelEnv, compile: bool = False) -> nn.Module:
    """``model`` (the whole model or a pipeline stage, materialised) with ``plan`` applied, for
    a training loop of your own; ``env`` from :func:`zhilu.parallel.mesh.init_parallel`."""
    spec.check_plan(plan)
    return _apply(model, spec, plan, env, compile)[0]


def _apply(model: nn.Module, spec: ModelSpec, plan: Plan, env: ParallelEnv, compile: bool) -> tuple[nn.Module, bool]:
    sharded = False
    if plan.tp > 1:
        sharded = apply_tensor_parallel(model, env.mesh["tp"], spec.tp_plan or {}, spec.sp_plan, plan.sp)  # type: ignore[index]
    units: list[nn.Module] = []
    if spec.blocks is not None:
        blocks = spec.blocks_of(model)
        apply_recompute(blocks, plan.recompute)
        units = list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)
    if compile:
        for unit in units or [model]:
            unit.compile()
    return apply_data_parallel(model, units, plan, env), sharded


def build_parallel(spec: ModelSpec, plan: Plan, env: ParallelEnv, seed: int, compile: bool = False) -> ParallelModel:
    """What this rank runs of ``spec``'s model under ``plan``: built, initialised from ``seed``, parallelised."""
    spec.check_plan(plan)
    sharded: list[bool] = []

    def wrap(part: nn.Module) -> nn.Module:
        part, logits_sharded = _apply(part, spec, plan, env, compile)
        sharded.append(logits_sharded)
        return part

    if plan.pp > 1:
        pipeline = Pipeline(spec, plan, env, seed, wrap)
        return ParallelModel(pipeline.parts, pipeline, any(sharded))
    part = wrap(spec.create(env.device, seed))
    return ParallelModel([part], None, sharded[0])
