"""A ``zhilu train`` job as the performance model sees it: its plan, hardware and software.

``zhilu train`` predicts the step time and memory of the plan it runs before the first step
(:func:`predict`), picks the plan with ``--plan auto`` (:func:`auto`), and after the run
names what dominated the step and the plan the model would switch to (:func:`explain`).
The plan is the runtime's own :class:`zhilu.plan.Plan`. Pure Python, like the rest of
:mod:`zhilu.perf`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NoReturn

from zhilu.errors import ZhiluError
from zhilu.models.presets import GPTConfig
from zhilu.perf.comm import collective_seconds, members_per_node
from zhilu.perf.device import Cluster
from zhilu.perf.flops import Transformer
from zhilu.perf.hardware_file import calibrated_path, cluster
from zhilu.perf.presets import PRESETS, gpu_preset
from zhilu.perf.search import search
from zhilu.perf.software import ZHILU, Software
from zhilu.perf.step import Estimate, StepModel
from zhilu.plan import Plan
from zhilu.plan import device_precision as precision  # what zhilu trains in: precision(device_type)

__all__ = ["MEANING", "auto", "candidates", "explain", "hardware", "precision", "predict", "software", "spec"]

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


def predict(model: GPTConfig, seq_len: int, global_batch: int, plan: Plan, hw: Cluster, device_type: str,
            nodes_of: int | None = None, average_optimizer_state: bool = False) -> Estimate:
    """Step time, breakdown and memory of ``plan`` on ``hw`` (``nodes_of`` devices to a node);
    ``precision=auto`` is what zhilu trains in on ``device_type``.

    Model averaging (``avg_every`` H) trains the replicas alone: no gradient traffic, and every
    H steps an all-reduce of the weights (and of AdamW's two moments when they are averaged).
    Hybrid (``avg_groups`` G): DDP within each group of ``dp / G`` consecutive replicas, and the
    average over the G ranks at the same place in each group.
    """
    c = hw.sized(plan.world_size, nodes_of)
    steps = StepModel(Transformer(model, seq_len), c, global_batch, software(device_type))
    e = steps.evaluate(plan.resolved(device_type))
    if not plan.avg_every:
        return e
    if plan.avg_groups:
        n, stride = plan.avg_groups, plan.dp // plan.avg_groups
        per_node = max(1, min(n, c.devices_per_node // stride))
    else:
        n, per_node = plan.dp, members_per_node(plan.tp, plan.dp, c.devices_per_node)[0]
    tensors = 3 if average_optimizer_state else 1
    average = collective_seconds("all_reduce", model.num_params() * 4 * tensors, n, per_node, c)
    breakdown = dict(e.breakdown, dp_comm_exposed=e.breakdown["dp_comm_exposed"] + average / plan.avg_every)
    step = e.step_time_s - e.breakdown["dp_comm_exposed"] + breakdown["dp_comm_exposed"]
    scale = e.step_time_s / step
    return replace(e, step_time_s=step, breakdown=breakdown, tokens_per_s=e.tokens_per_s * scale,
                   model_tflops_per_gpu=e.model_tflops_per_gpu * scale, mfu=e.mfu * scale)


def candidates(model: GPTConfig, seq_len: int, global_batch: int, world: int, hw: Cluster, device_type: str,
               nodes_of: int | None = None) -> list[tuple[Plan, Estimate]]:
    """Every plan zhilu can run for this job that fits, fastest first by prediction; each plan
    with ``precision=auto`` (what it was predicted in on ``device_type``)."""
    ranked = _ranked(model, seq_len, global_batch, world, hw, device_type, nodes_of)
    return [(plan, e) for plan, e, why in ranked if not why] or _none_runnable(world, hw)


def auto(model: GPTConfig, seq_len: int, global_batch: int, world: int, hw: Cluster, device_type: str,
         nodes_of: int | None = None, runners_up: int = 2) -> tuple[Plan, Estimate, list[str]]:
    """The plan ``--plan auto`` runs: the fastest predicted among those zhilu can run that fit;
    its estimate; and a line for each faster plan zhilu cannot run (and why; at most
    ``runners_up + 1``), then for the next ``runners_up`` it could (and how much slower)."""
    ranked = _ranked(model, seq_len, global_batch, world, hw, device_type, nodes_of)
    chosen = next((i for i, (_, _, why) in enumerate(ranked) if not why), None)
    if chosen is None:
        _none_runnable(world, hw)
    plan, best, _ = ranked[chosen]
    lines = [f"passed over {p.spec()} ({e.step_time_s * 1e3:,.0f} ms/step): {why}"
             for p, e, why in ranked[:chosen][:runners_up + 1]]
    slower = [(p, e) for p, e, why in ranked[chosen + 1:] if not why][:runners_up]
    lines += [f"runner-up {p.spec()} ({e.step_time_s * 1e3:,.0f} ms/step, {e.step_time_s / best.step_time_s - 1:+.0%})"
              for p, e in slower]
    return plan, best, lines


def _none_runnable(world: int, hw: Cluster) -> NoReturn:
    raise ZhiluError("parallel.plan", f"auto: no plan zhilu can run fits {world} x {hw.device.name}; "
                                      "give a plan, a smaller model or batch, or more devices")


def _ranked(model: GPTConfig, seq_len: int, global_batch: int, world: int, hw: Cluster, device_type: str,
            nodes_of: int | None) -> list[tuple[Plan, Estimate, str]]:
    """Every plan that fits, fastest first, with why zhilu cannot run it ("" when it can)."""
    found = search(Transformer(model, seq_len), hw.sized(world, nodes_of), global_batch,
                   fixed={"precision": precision(device_type)}, software=software(device_type))
    ranked = []
    for e in found:
        plan = replace(e.plan, precision="auto")
        try:
            plan.validate(world)
            plan.check_model(model)
            plan.check_batch(global_batch)
            why = ""
        except ZhiluError as error:
            why = str(error)
        ranked.append((plan, e, why))
    return ranked


def explain(model: GPTConfig, seq_len: int, global_batch: int, plan: Plan, hw: Cluster, device_type: str,
            nodes_of: int | None = None) -> dict[str, Any]:
    """What dominates ``plan``'s step, and the plan the model would switch to with its predicted speed-up.

    One machine's calibration errs alike for every plan, so the ratio of two predictions is
    the gain to expect even where the absolute step time is off.
    """
    current = predict(model, seq_len, global_batch, plan, hw, device_type, nodes_of)
    top = max(current.breakdown, key=lambda k: current.breakdown[k])
    best_plan, best, _ = auto(model, seq_len, global_batch, plan.world_size, hw, device_type, nodes_of)
    gain = current.step_time_s / best.step_time_s
    switch = None
    if gain > 1.02 and best_plan.resolved(device_type) != replace(plan, avg_every=0).resolved(device_type):
        switch = {"plan": best_plan.spec(), "predicted_step_time_s": best.step_time_s, "predicted_speedup": gain}
    return {"dominating": top, "share": current.breakdown[top] / current.step_time_s, "meaning": MEANING[top],
            "switch_to": switch}
