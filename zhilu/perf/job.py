"""A ``zhilu train`` job as the performance model sees it: its plan, hardware and software.

``zhilu train`` predicts the step time and memory of the plan it runs before the first step
(:func:`predict`), picks the plan with ``--plan auto`` (:func:`auto`), and after the run
names what dominated the step and the plan the model would switch to (:func:`explain`).
Pure Python, like the rest of :mod:`zhilu.perf`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from zhilu.errors import ZhiluError
from zhilu.hardware import PRESETS, Cluster, calibrated_path, cluster, gpu_preset
from zhilu.models.presets import GPTConfig
from zhilu.perf.comm import collective_seconds, members_per_node
from zhilu.perf.flops import Transformer
from zhilu.perf.search import search
from zhilu.perf.step import ZHILU, Estimate, Software, StepModel
from zhilu.perf.step import Plan as StepPlan
from zhilu.plan import Plan

# What each term of the breakdown is, in words.
MEANING = {
    "compute": "the products and kernels themselves",
    "recompute": "recomputed activations (recompute trades this time for memory)",
    "tp_comm": "tensor-parallel traffic",
    "pp_comm": "pipeline transfers",
    "dp_comm_exposed": "data-parallel traffic not hidden under backward",
    "bubble": "the pipeline bubble (idle stages at the start and end of a step)",
    "optimizer": "the optimizer step",
    "other": "issuing kernels (host overhead of many small ops)",
}


def precision(device_type: str) -> str:
    """What zhilu trains in: bf16 autocast with fp32 master weights on GPUs, fp32 on CPUs."""
    return "bf16" if device_type == "cuda" else "fp32"


def software(device_type: str) -> Software:
    """zhilu's runtime on ``device_type``: fused AdamW on GPUs, PyTorch's foreach AdamW on CPUs."""
    return replace(ZHILU, foreach_adamw=device_type != "cuda")


def hardware(name: str, device_type: str, nproc: int, device_name: str = "") -> tuple[Cluster | None, str]:
    """The hardware a job is predicted on, and where it came from (``None, ""``: nothing known).

    ``name``: a preset or a hardware file; empty: this machine's calibration for ``nproc``
    processes (``zhilu calibrate``) if there is one, else the preset of the GPU named
    ``device_name``, else on a CPU the ``cpu`` preset.
    """
    if name:
        return cluster(name), name
    path = calibrated_path(device_type, nproc)
    if path.exists():
        return cluster(str(path)), str(path)
    key = gpu_preset(device_name) if device_type == "cuda" else "cpu"
    return (PRESETS[key], key) if key else (None, "")


def step_plan(plan: Plan, global_batch: int, device_type: str) -> StepPlan:
    """The performance model's form of a training plan (``mb`` counts micro-batches, the model
    counts sequences per micro-batch)."""
    return StepPlan(plan.dp, plan.tp, plan.pp, plan.zero, global_batch // plan.dp // plan.mb, plan.schedule,
                    plan.stages_per_rank if plan.pp > 1 else 1, plan.recompute, plan.sp and plan.tp > 1,
                    precision(device_type))


def train_plan(e: Estimate) -> Plan:
    """The training plan of an estimate."""
    p = e.plan
    return Plan(dp=p.dp, tp=p.tp, pp=p.pp, zero=p.zero, mb=e.micro_batches, schedule=p.schedule,
                vstages=p.virtual_stages if p.schedule == "interleaved" else 0, sp=p.sequence_parallel,
                recompute=p.recompute)


def predict(model: GPTConfig, seq_len: int, global_batch: int, plan: Plan, hw: Cluster, device_type: str,
            nodes_of: int | None = None, average_optimizer_state: bool = False) -> Estimate:
    """Step time, breakdown and memory of ``plan`` on ``hw`` (``nodes_of`` devices to a node).

    Model averaging (``avg_every`` H) trains the replicas alone: no gradient traffic, and every
    H steps an all-reduce of the weights (and of AdamW's two moments when they are averaged).
    """
    c = hw.sized(plan.world_size, nodes_of)
    steps = StepModel(Transformer(model, seq_len), c, global_batch, software(device_type))
    e = steps.evaluate(step_plan(plan, global_batch, device_type))
    if not plan.avg_every:
        return e
    dp_per_node, _ = members_per_node(plan.tp, plan.dp, c.devices_per_node)
    tensors = 3 if average_optimizer_state else 1
    average = collective_seconds("all_reduce", model.num_params() * 4 * tensors, plan.dp, dp_per_node, c)
    breakdown = dict(e.breakdown, dp_comm_exposed=average / plan.avg_every)
    step = e.step_time_s - e.breakdown["dp_comm_exposed"] + breakdown["dp_comm_exposed"]
    scale = e.step_time_s / step
    return replace(e, step_time_s=step, breakdown=breakdown, tokens_per_s=e.tokens_per_s * scale,
                   model_tflops_per_gpu=e.model_tflops_per_gpu * scale, mfu=e.mfu * scale)


def candidates(model: GPTConfig, seq_len: int, global_batch: int, world: int, hw: Cluster, device_type: str,
               nodes_of: int | None = None) -> list[tuple[Plan, Estimate]]:
    """Every plan zhilu can run for this job that fits, fastest first by prediction."""
    c = hw.sized(world, nodes_of)
    found = search(Transformer(model, seq_len), c, global_batch, fixed={"precision": precision(device_type)},
                   software=software(device_type))
    runnable = []
    for e in found:
        plan = train_plan(e)
        try:
            plan.validate(world)
            plan.check_model(model)
            plan.check_batch(global_batch)
        except ZhiluError:
            continue
        runnable.append((plan, e))
    if not runnable:
        raise ZhiluError("parallel.plan", f"auto: no plan zhilu can run fits {world} x {c.device.name}; "
                                          "give a plan, a smaller model or batch, or more devices")
    return runnable


def auto(model: GPTConfig, seq_len: int, global_batch: int, world: int, hw: Cluster, device_type: str,
         nodes_of: int | None = None) -> tuple[Plan, Estimate]:
    """The plan ``--plan auto`` runs: the fastest predicted among those zhilu can run that fit."""
    return candidates(model, seq_len, global_batch, world, hw, device_type, nodes_of)[0]


def explain(model: GPTConfig, seq_len: int, global_batch: int, plan: Plan, hw: Cluster, device_type: str,
            nodes_of: int | None = None) -> dict[str, Any]:
    """What dominates ``plan``'s step, and the plan the model would switch to with its predicted speed-up.

    One machine's calibration errs alike for every plan, so the ratio of two predictions is
    the gain to expect even where the absolute step time is off.
    """
    current = predict(model, seq_len, global_batch, plan, hw, device_type, nodes_of)
    top = max(current.breakdown, key=lambda k: current.breakdown[k])
    best_plan, best = auto(model, seq_len, global_batch, plan.world_size, hw, device_type, nodes_of)
    gain = current.step_time_s / best.step_time_s
    switch = None
    if gain > 1.02 and best_plan != replace(plan, avg_every=0):
        switch = {"plan": spec(best_plan), "predicted_step_time_s": best.step_time_s, "predicted_speedup": gain}
    return {"dominating": top, "share": current.breakdown[top] / current.step_time_s, "meaning": MEANING[top],
            "switch_to": switch}


def spec(plan: Plan) -> str:
    """The ``--plan`` SPEC that reproduces ``plan`` (defaults left out, degrees always given)."""
    default = Plan()
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in plan.to_dict().items()
                    if v != getattr(default, k) or k in ("dp", "tp", "pp"))
