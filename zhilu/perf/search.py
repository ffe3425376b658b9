"""Search every valid plan and rank those that fit by predicted step time.

Valid plans: ``dp * tp * pp`` = the devices; ``tp`` inside a node and dividing the heads,
kv-heads and ffn size; ``pp`` up to the layers; micro-batch sizes dividing the sequences of
a replica; ZeRO 0-3 when ``dp > 1``; 1F1B, or interleaved with ``v`` virtual stages (``v``
divides the layers of a full stage; micro-batches a multiple of ``pp``, as Megatron-LM and
PyTorch require); recompute none/selective/full.

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
from zhilu.hardware import Cluster, cluster as load_cluster
from zhilu.models.presets import GPTConfig
from zhilu.perf.flops import Transformer
from zhilu.perf.memory import GIB
from zhilu.perf.step import RECOMPUTE, ZHILU, Estimate, Plan, Software, StepModel

PLAN_FIELDS = tuple(f.name for f in fields(Plan))


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
    """Plans that fit, fastest first; ``fixed`` pins plan fields (e.g. ``{"tp": 8}``).

    With every field pinned, exactly that plan, whether or not it fits. Raises
    :class:`ZhiluError` when no plan is valid or none fits. ``require_fit=False`` ranks
    plans regardless of memory (to predict a run that is known to have fitted).
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(PLAN_FIELDS)
    if unknown:
        raise ZhiluError("plan", f"unknown plan field {sorted(unknown)[0]!r}; valid: {', '.join(PLAN_FIELDS)}")
    steps = StepModel(model, cluster, global_batch, software)
    whole = {"precision": default_precision(cluster), **fixed}
    if _complete(whole):
        return [steps.evaluate(Plan(**whole))]
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
                                     f"({', '.join(f'{k}={v}' for k, v in fixed.items()) or 'none fixed'})")
        raise ZhiluError("plan", f"no plan fits in {cluster.device.memory_gib:g} GiB per device; the smallest "
                                 f"needs {smallest[0] / GIB:.1f} GiB ({smallest[1].label()}): add devices or "
                                 "use a smaller model, batch or sequence")
    found.sort(key=lambda e: e.step_time_s)
    return found[:top] if top else found


def best_plan(config: GPTConfig, *, seq_len: int, global_batch: int, gpus: int, hardware: str | Cluster,
              gpus_per_node: int | None = None, fixed: dict[str, Any] | None = None,
              software: Software = ZHILU) -> Estimate:
    """The fastest plan that fits: what ``zhilu train --plan auto`` runs.

    ``hardware`` is a preset name, a hardware file path or a :class:`Cluster`;
    ``fixed`` pins plan fields (``dp``, ``tp``, ``pp``, ``zero``, ``micro_batch``,
    ``schedule``, ``virtual_stages``, ``recompute``, ``sequence_parallel``, ``precision``;
    precision defaults to :func:`default_precision`). Raises :class:`ZhiluError` when
    nothing fits. ``Estimate.plan_spec()`` gives the ``--plan`` SPEC.
    """
    if isinstance(hardware, str):
        c = load_cluster(hardware, gpus, gpus_per_node)
    else:
        c = hardware.sized(gpus, gpus_per_node)
    return search(Transformer(config, seq_len), c, global_batch, fixed=fixed, software=software, top=1)[0]


def _complete(fixed: dict[str, Any]) -> bool:
    """Whether ``fixed`` pins a whole plan (sequence parallelism and virtual stages only where they apply)."""
    needed = {"dp", "tp", "pp", "zero", "micro_batch", "schedule", "recompute", "precision"}
    if not needed <= set(fixed):
        return False
    return ((fixed["tp"] == 1 or "sequence_parallel" in fixed)
            and (fixed["schedule"] != "interleaved" or "virtual_stages" in fixed))


def _check_degrees(steps: StepModel, fixed: dict[str, Any]) -> None:
    """Readable errors for pinned degrees that cannot work, before searching the rest."""
    m, c = steps.model, steps.cluster
    for name in ("dp", "tp", "pp"):
        v = fixed.get(name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ZhiluError(name, f"must be a positive integer, got {v!r}")
        if v is not None and c.devices % v:
            raise ZhiluError(name, f"{name}={v} must divide the {c.devices} devices")
    tp = fixed.get("tp")
    if tp is not None:
        if tp > c.devices_per_node:
            raise ZhiluError("tp", f"tp={tp} must fit in a node of {c.devices_per_node} devices")
        if m.heads % tp or m.kv_heads % tp:
            raise ZhiluError("tp", f"tp={tp} must divide heads={m.heads} and kv_heads={m.kv_heads}")
        if m.ffn % tp:
            raise ZhiluError("tp", f"tp={tp} must divide ffn={m.ffn}")
    if fixed.get("pp") is not None and fixed["pp"] > m.layers:
        raise ZhiluError("pp", f"pp={fixed['pp']} exceeds the {m.layers} layers")
    product = 1
    for name in ("dp", "tp", "pp"):
        product *= fixed.get(name, 1)
    if c.devices % product or (len({"dp", "tp", "pp"} & set(fixed)) == 3 and product != c.devices):
        raise ZhiluError("dp", f"dp*tp*pp = {product} must equal the {c.devices} devices")
    if fixed.get("dp") is not None and steps.global_batch % fixed["dp"]:
        raise ZhiluError("dp", f"dp={fixed['dp']} must divide the global batch {steps.global_batch}")


def _candidates(steps: StepModel, fixed: dict[str, Any]) -> Iterator[list[Plan]]:
    """Valid, non-dominated plans (see the module docstring), as chains that differ in recompute only."""
    m, c, batch = steps.model, steps.cluster, steps.global_batch
    n = c.devices

    def allowed(name: str, values: list) -> list:
        return ([fixed[name]] if fixed[name] in values else []) if name in fixed else values

    precision = fixed.get("precision") or default_precision(c)
    recomputes = allowed("recompute", list(RECOMPUTE))
    tps = [t for t in divisors(n) if t <= c.devices_per_node and not m.heads % t and not m.kv_heads % t
           and not m.ffn % t]
    for tp in allowed("tp", tps):
        sp = tp > 1 and fixed.get("sequence_parallel", True)
        for pp in allowed("pp", [p for p in divisors(n // tp) if p <= m.layers]):
            dp = n // (tp * pp)
            if batch % dp or fixed.get("dp", dp) != dp:
                continue
            per_replica = batch // dp
            zeros = allowed("zero", [0, 1, 2, 3] if dp > 1 else [0])
            for b in allowed("micro_batch", divisors(per_replica)):
                micro_batches = per_replica // b
                pinned = fixed.get("schedule")
                schedules = [("gpipe" if pinned == "gpipe" else "1f1b", 1)]
                if pp > 1 and pinned != "gpipe" and not micro_batches % pp:
                    full_stage = -(-m.layers // pp)
                    schedules += [("interleaved", v) for v in divisors(full_stage) if 2 <= v and pp * v <= m.layers]
                for schedule, v in schedules:
                    if fixed.get("schedule", schedule) != schedule or fixed.get("virtual_stages", v) != v:
                        continue
                    for zero in zeros:
                        yield [Plan(dp, tp, pp, zero, b, schedule, v, rec, sp, precision) for rec in recomputes]
