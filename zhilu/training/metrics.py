"""The files a run writes as it goes: metrics.jsonl (one line per logged step) and summary.json.

Both are strict JSON: a NaN or infinite number is written as null.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zhilu.monitor.memory import peak_memory_gib
from zhilu.spec import ModelSpec, measure_flops


class MetricsFile:
    """metrics.jsonl, one line per logged step. Continuing from step ``start_step`` (a resume, a
    restart, a rollback) drops the lines past it, so the file is the history of the run's state."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except ValueError:  # a line cut short by a crash
                    break
        self._file = None
        self.truncate(start_step)

    def truncate(self, step: int) -> None:
        """Keep the lines of steps up to ``step``; later writes follow them."""
        self.records = [r for r in self.records if isinstance(r, dict) and r.get("step", step + 1) <= step]
        if self._file is not None:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(_dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(_dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def hardware_flops_ratio(spec: ModelSpec, recompute: str, inputs: Tensor, targets: Tensor) -> float:
    """Hardware FLOPs over model FLOPs (HFU over MFU): 1 without recomputation; with it, the
    FLOPs counted for one sample with the blocks wrapped for recomputation (their forward is
    dispatched, and counted, again in the backward) over those counted without."""
    if recompute == "none":
        return 1.0
    from zhilu.parallel.recompute import apply_recompute

    sample = inputs[:1], targets[:1]
    recomputed = measure_flops(spec, *sample, prepare=lambda model: apply_recompute(spec.blocks_of(model), recompute))
    return recomputed / measure_flops(spec, *sample)


def step_record(trainer: Any, step: int, loss: float, grad_norm: float, measured: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl line of a logged step of ``trainer``; ``measured``: its step clock's interval."""
    step_time = measured["step_time_s"]
    device, prediction = trainer.device, trainer.prediction
    record = {
        "step": step,
        "batch": trainer.loader.index,
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "step_time_s": step_time,
        "tokens_per_s": trainer.items_per_step / step_time,
        "mfu": (mfu := trainer._mfu(step_time)),
        "hfu": mfu * trainer.hfu_ratio if mfu is not None else None,
        "mem_gib": peak_memory_gib(device),
        "elapsed_s": time.perf_counter() - trainer.wall_start,
        "eta_s": (trainer.cfg.train.steps - step) * step_time,
        **{k: v for k, v in measured.items() if k != "step_time_s"},
    }
    if device.type == "cuda":
        record["mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if prediction is not None:
        record["predicted_step_time_s"] = prediction.step_time_s
        record["predicted"] = dict(prediction.breakdown)
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(finite(record), allow_nan=False)
