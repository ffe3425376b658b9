"""Search every valid plan and rank those that fit by predicted step time.

Valid plans (:class:`zhilu.plan.Plan`'s rules, and the hardware's): ``dp * tp * pp`` = the
devices; ``tp`` dividing a node's devices (each group inside one node), the heads, kv-heads and
ffn size; ``pp`` up to the layers; micro-batch sizes dividing the sequences of a replica, with
at least ``pp`` micro-batches under a pipeline; ZeRO 0-3 when ``dp > 1``; 1F1B, or interleaved with ``v``
virtual stages (``v`` divides the layers of a full stage; micro-batches a multiple of ``pp``,
as Megatron-LM and PyTorch require); recompute none/selective/full. Software that cannot
split a tied embedding over stages (zhilu's) gets no pipeline for a tied model; one that
splits the layers evenly (Megatron-LM) only ``pp`` dividing them.

Pruned as dominated (slower, or as fast and needing more memory): GPipe (the same time
as 1F1B in this model with more micro-batches in flight), tensor parallelism without
sequence parallelism (the same traffic, more memory and elementwise work), and for each
other choice every recompute mode after the first that fits (each adds work).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from zhilu.errors import ZhiluError
from zhilu.models.presets import GPTConfig
from zhilu.perf.device import Cluster
from zhilu.perf.flops import Transformer
from zhilu.perf.hardware_file import cluster as load_cluster
from zhilu.perf.memory import GIB
from zhilu.perf.software import ZHILU, Software
from zhilu.perf.step import Estimate, StepModel
from zhilu.plan import RECOMPUTE, Plan, PlanError

# Plan fields a search can pin, and ``micro_batch``: sequences per micro-batch (``mb`` counts them)
PLAN_FIELDS = tuple(f.name for f in fields(Plan) if f.name != "avg_every") + ("micro_batch",)


def divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def default_precision(cluster: Cluster) -> str:
    """bf16 mixed precision where the device multiplies bf16 faster than fp32 (GPUs), else fp32."""
    rates = cluster.device.matmul_tflops
    return "bf16" if rates["bf16"] >= rates["fp32"] else "fp32"


def search(model: Transformer, cluster: Cluster, global_batch: int, *, fixed: dict[str, Any] | None = None,
           software: Software = ZHILU, top: int | None = None, require_fit: bool = True) -> list[Estimate]:
    """Plans that fit, fastest first; ``fixed`` pins plan fields (e.g. ``{"tp": 8}``; ``micro_batch``
    pins the sequences per micro-batch, ``mb`` their number).

    With every field pinned, exactly that plan, whether or not it fits. Raises
    :class:`ZhiluError` when no plan is valid or none fits. ``require_fit=False`` ranks
    plans regardless of memory (to predict a run that is known to have fitted).
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(PLAN_FIELDS)
    if unknown:
        raise ZhiluError("plan", f"unknown plan field {sorted(unknown)[0]!r}; valid: {', '.join(PLAN_FIELDS)}")
    if not fixed.get("vstages", 1):
        del fixed["vstages"]  # 0: the schedule's default, as if not given
    given = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "none fixed"
    if fixed.get("precision") in (None, "auto"):
        fixed["precision"] = default_precision(cluster)
    steps = StepModel(model, cluster, global_batch, software)
    _check_stack(software, fixed)
    if _complete(fixed):
        return [steps.evaluate(_whole(fixed, global_batch))]
    if "dp" in fixed or "tp" in fixed or "pp" in fixed:
        _check_degrees(steps, fixed)
    found: list[Estimate] = []
    smallest: tuple[float, Plan] | None = None
    device_bytes = cluster.device.memory_gib * GIB
    for chain in _candidates(steps, fixed):
        for plan in chain:  # recompute none, selective, full: the first that fits dominates the rest
            mem = steps.memory_total(plan)
            if mem <= device_bytes or not require_fit:
                found.append(steps.estimate(plan))
                break
            if smallest is None or mem < smallest[0]:
                smallest = (mem, plan)
    if not found:
        if smallest is None:
            raise ZhiluError("plan", f"no valid plan for {cluster.devices} devices with these settings "
                                     f"({given})")
        raise ZhiluError("plan", f"no plan fits in {cluster.device.memory_gib:g} GiB per device; the smallest "
                                 f"needs {smallest[0] / GIB:.1f} GiB ({smallest[1].describe()}): add devices or "
                                 "use a smaller model, batch or sequence")
    found.sort(key=lambda e: e.step_time_s)
    return found[:top] if top else found


def best_plan(config: GPTConfig, *, seq_len: int, global_batch: int, gpus: int, hardware: str | Cluster,
              gpus_per_node: int | None = None, fixed: dict[str, Any] | None = None,
              software: Software = ZHILU) -> Estimate:
    """The fastest plan that fits: what ``zhilu train --plan auto`` runs.

    ``hardware`` is a preset name, a hardware file path or a :class:`Cluster`;
    ``fixed`` pins fields of :class:`zhilu.plan.Plan` (``dp``, ``tp``, ``pp``, ``zero``, ``mb``,
    ``schedule``, ``vstages``, ``sp``, ``recompute``, ``precision``; precision defaults to
    :func:`default_precision`) or ``micro_batch`` (sequences per micro-batch). Raises
    :class:`ZhiluError` when nothing fits. ``Estimate.plan_spec()`` gives the ``--plan`` SPEC.
    """
    if isinstance(hardware, str):
        c = load_cluster(hardware, gpus, gpus_per_node)
    else:
        c = hardware.sized(gpus, gpus_per_node)
    return search(Transformer(config, seq_len), c, global_batch, fixed=fixed, software=software, top=1)[0]


def _complete(fixed: dict[str, Any]) -> bool:
    """Whether ``fixed`` pins a whole plan (sequence parallelism and virtual stages only where they apply)."""
    needed = {"dp", "tp", "pp", "zero", "schedule", "recompute", "precision"}
    if not needed <= set(fixed) or not {"mb", "micro_batch"} & set(fixed):
        return False
    return ((fixed["tp"] == 1 or "sp" in fixed)
            and (fixed["schedule"] != "interleaved" or "vstages" in fixed))


def _whole(fixed: dict[str, Any], global_batch: int) -> Plan:
    """The plan ``fixed`` pins whole, its micro-batch size (``micro_batch``) turned into a count."""
    values = dict(fixed)
    size = values.pop("micro_batch", None)
    if size is not None:
        dp = values["dp"]
        if not isinstance(dp, int) or dp < 1 or global_batch % dp:
            raise ZhiluError("dp", f"dp={dp} must divide the global batch {global_batch}")
        if not isinstance(size, int) or size < 1 or (global_batch // dp) % size:
            raise ZhiluError("micro_batch", f"{size} must divide the {global_batch // dp} sequences per "
                                            "data-parallel replica")
        count = global_batch // dp // size
        if values.setdefault("mb", count) != count:
            raise ZhiluError("micro_batch", f"{size} sequences per micro-batch make {count} micro-batches, "
                                            f"not mb={values['mb']}")
    if values["tp"] == 1:
        values.setdefault("sp", False)
    return Plan(**values)


def _check_stack(sw: Software, fixed: dict[str, Any]) -> None:
    """A readable error for a pinned field the software stack cannot run."""
    pp, recompute = fixed.get("pp", 1), fixed.get("recompute", "none")
    beyond = {"sp": fixed.get("sp") and not sw.sequence_parallel and "sequence parallelism",
              "schedule": fixed.get("schedule") == "interleaved" and not sw.interleaved and "the interleaved schedule",
              "recompute": recompute not in sw.recomputes and f"recompute={recompute}",
              "zero": fixed.get("zero", 0) > min(sw.max_zero, sw.pipeline_max_zero if pp > 1 else 3)
              and f"ZeRO-{fixed.get('zero')}" + (" beside a pipeline" if pp > 1 else "")}
    for name, what in beyond.items():
        if what:
            raise ZhiluError(name, f"the {sw.name} stack cannot run {what}")


def _check_degrees(steps: StepModel, fixed: dict[str, Any]) -> None:
    """Readable errors for pinned degrees that cannot work, before searching the rest: they must
    divide the devices, ``tp`` a node's devices, and the plan's own rules hold for them."""
    c = steps.cluster
    for name in ("dp", "tp", "pp"):
        v = fixed.get(name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ZhiluError(name, f"must be a positive integer, got {v!r}")
        if v is not None and c.devices % v:
            raise ZhiluError(name, f"{name}={v} must divide the {c.devices} devices")
    tp = fixed.get("tp", 1)
    if c.devices_per_node % tp:
        raise ZhiluError("tp", f"tp={tp} must divide a node's {c.devices_per_node} devices (each group inside a node)")
    product = 1
    for name in ("dp", "tp", "pp"):
        product *= fixed.get(name, 1)
    if c.devices % product or (len({"dp", "tp", "pp"} & set(fixed)) == 3 and product != c.devices):
        raise ZhiluError("dp", f"dp*tp*pp = {product} must equal the {c.devices} devices")
    pinned = Plan(dp=fixed.get("dp", 1), tp=tp, pp=fixed.get("pp", 1))
    try:
        pinned.check_model(steps.model.config, runtime=not steps.software.ties_across_stages)
        pinned.check_batch(steps.global_batch)
    except PlanError as e:
        raise ZhiluError(e.key, e.message) from None


def _candidates(steps: StepModel, fixed: dict[str, Any]) -> Iterator[list[Plan]]:
    """Valid, non-dominated plans (see the module docstring), as chains that differ in recompute only."""
    m, c, batch, sw = steps.model, steps.cluster, steps.global_batch, steps.software
    n = c.devices

    def allowed(name: str, values: list) -> list:
        return ([fixed[name]] if fixed[name] in values else []) if name in fixed else values

    precision = fixed["precision"]
    recomputes = allowed("recompute", [r for r in RECOMPUTE if r in sw.recomputes])
    tps = [t for t in divisors(n) if not c.devices_per_node % t and not m.heads % t and not m.kv_heads % t
           and not m.ffn % t]
    pps = [p for p in divisors(n) if p <= m.layers and (sw.stage_split != "even" or not m.layers % p)
           and (p == 1 or sw.ties_across_stages or not m.tied)]
    for tp in allowed("tp", tps):
        sp = tp > 1 and fixed.get("sp", sw.sequence_parallel)
        for pp in allowed("pp", [p for p in pps if not (n // tp) % p]):
            dp = n // (tp * pp)
            if batch % dp or fixed.get("dp", dp) != dp:
                continue
            per_replica = batch // dp
            top = min(sw.max_zero, sw.pipeline_max_zero if pp > 1 else 3) if dp > 1 else 0
            zeros = allowed("zero", list(range(top + 1)))
            for b in allowed("micro_batch", divisors(per_replica)):
                micro_batches = per_replica // b
                if fixed.get("mb", micro_batches) != micro_batches or (pp > 1 and micro_batches < pp):
                    continue
                pinned = fixed.get("schedule")
                schedules = [("gpipe" if pinned == "gpipe" else "1f1b", 1)]
                if pp > 1 and pinned != "gpipe" and sw.interleaved and not micro_batches % pp:
                    full_stage = -(-m.layers // pp)
                    schedules += [("interleaved", v) for v in divisors(full_stage) if 2 <= v and pp * v <= m.layers]
                for schedule, v in schedules:
                    if fixed.get("schedule", schedule) != schedule or fixed.get("vstages", v) != v:
                        continue
                    vstages = v if schedule == "interleaved" else 0
                    for zero in zeros:
                        yield [Plan(dp=dp, tp=tp, pp=pp, zero=zero, mb=micro_batches, schedule=schedule,
                                    vstages=vstages, sp=sp, recompute=rec, precision=precision) for rec in recomputes]
