"""What the performance model says of the job a trainer runs: before the first step and after the last."""

from __future__ import annotations

from typing import Any

from zhilu.config import JobConfig
from zhilu.errors import ZhiluError
from zhilu.hardware import Cluster
from zhilu.perf import job
from zhilu.perf.step import Estimate
from zhilu.plan import Plan
from zhilu.spec import ModelSpec


def predict(cfg: JobConfig, spec: ModelSpec, plan: Plan, hw: Cluster | None, device_type: str,
            nodes_of: int) -> tuple[Estimate | None, str]:
    """The prediction for this job, or None with the reason there is none."""
    if hw is None:
        return None, "this device is not known; `zhilu calibrate` measures it"
    if spec.shape is None:
        return None, f"{spec.name} declares no transformer shape for the performance model"
    t = cfg.train
    try:
        return job.predict(spec.shape, t.seq_len, t.global_batch, plan, hw, device_type, nodes_of,
                           cfg.parallel.average_optimizer_state), ""
    except ZhiluError as e:  # a plan the model does not cover still trains
        return None, str(e)


def explain(cfg: JobConfig, spec: ModelSpec, plan: Plan, hw: Cluster, device_type: str,
            nodes_of: int) -> dict[str, Any] | None:
    """What dominated the predicted step and the plan the model would switch to."""
    if spec.shape is None:
        return None
    try:
        return job.explain(spec.shape, cfg.train.seq_len, cfg.train.global_batch, plan, hw, device_type, nodes_of)
    except ZhiluError:
        return None


def describe(e: Estimate, hardware: str) -> str:
    """One line: the predicted step time with its largest terms, and the memory per rank."""
    parts = sorted(((v / e.step_time_s, k) for k, v in e.breakdown.items() if v >= 0.01 * e.step_time_s), reverse=True)
    line = (f"predicted {e.step_time_s * 1e3:,.0f} ms/step (" + ", ".join(f"{k} {share:.0%}" for share, k in parts)
            + f"), {e.memory_gib_per_device * 1024:,.1f} MiB per rank of model states and activations; "
            f"hardware: {hardware}")
    if hardware == "cpu":
        line += " (a rough preset; `zhilu calibrate` measures this machine)"
    return line
