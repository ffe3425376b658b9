"""summary.json: written for every run that started, however it ended.

``ended`` is one of :data:`ENDINGS`. A run that finished, aborted on bad steps or was
pre-empted is summarised by rank 0 with everything it measured; one that ran out of
restarts or was interrupted, by the launcher, with what it knows (the other keys null).
``final_params_sha256`` is :func:`zhilu.training.checkpoint.params_sha256` of the last
checkpoint: equal for two runs exactly when their parameters are bitwise equal.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from zhilu.monitor.correction import STEPS, from_records
from zhilu.training import predict
from zhilu.training.checkpoint import latest_checkpoint, params_sha256
from zhilu.training.metrics import write_json
from zhilu.training.sample import sample_text

SAMPLE_MAX_PARAMS = 2_000_000_000  # the end-of-run sample loads the whole model on rank 0

ENDINGS = ("finished", "aborted", "preempted", "failed", "interrupted")

# Filled by the trainer; the launcher's summary of a failed run has them null.
MEASURED = ("plan", "world_size", "device", "model", "params", "steps", "seq_len", "global_batch", "hardware",
            "predicted_step_time_s", "measured_step_time_s", "prediction_error", "predicted_breakdown",
            "predicted_memory_mib_per_rank", "corrected_step_time_s", "corrected_breakdown", "correction_factors",
            "corrected_error", "tokens_per_s", "mfu", "hfu", "peak_tflops", "final_loss",
            "final_val_loss", "final_val_loss_per_byte", "wall_s", "memory_mib_per_rank", "sample", "explain",
            "last_step", "bad_steps", "final_params_sha256")


def recovery(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The restarts of a run: how many, why, and the steps computed twice because of them."""
    return {"restarts": len(history), "restart_causes": history,
            "steps_recomputed": sum(h.get("steps_recomputed") or 0 for h in history)}


def note_resumed(history: list[dict[str, Any]], step: int | None) -> None:
    """Record in the last restart cause that its attempt continued from the checkpoint of ``step``
    (once: the ranks and the launcher both call this)."""
    if history and step is not None and "resumed_from_step" not in history[-1]:
        last = history[-1]
        last["resumed_from_step"] = step
        last["steps_recomputed"] = max(0, (last.get("reached_step") or step) - step)


def write_ended(run_dir: Path, ended: str, error: str, history: list[dict[str, Any]],
                last_step: int | None = None) -> dict[str, Any]:
    """The launcher's summary of a run its ranks could not summarise (out of restarts, interrupted)."""
    summary = {"ended": ended, "error": error, **dict.fromkeys(MEASURED), **recovery(history), "last_step": last_step}
    if run_dir.is_dir():
        write_json(run_dir / "summary.json", summary)
    return summary


def step_times(records: list[dict[str, Any]]) -> list[float]:
    """Per-step times from metrics.jsonl records (each the mean over the steps since the one before)."""
    out: list[float] = []
    previous = 0
    for r in records:
        out += [r["step_time_s"]] * (r["step"] - previous)
        previous = r["step"]
    return out


def median_step_time(records: list[dict[str, Any]]) -> float | None:
    """The median step time, the first step (start-up, compilation) left out when there are others."""
    times = step_times(records)
    return statistics.median(times[1:] or times) if times else None


def corrected(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The prediction corrected by the first :data:`zhilu.monitor.correction.STEPS` steps, and its
    error on the median of the steps after them (None where the run has none)."""
    c = from_records(records)
    later = step_times(records)[STEPS:]
    return {"corrected_step_time_s": c.step_time_s if c else None,
            "corrected_breakdown": c.breakdown if c else None,
            "correction_factors": c.factors if c else None,
            "corrected_error": statistics.median(later) / c.step_time_s - 1 if c and later else None}


def run_summary(self: Any, ended: str, error: str | None, last_loss: float | None, val_loss: float | None,
                wall_s: float) -> dict[str, Any]:
    """The summary of a run a trainer (``self``) ran to an end: everything it measured."""
    t = self.cfg.train
    latest = latest_checkpoint(self.run_dir)  # the one just saved (or, resumed at the end, loaded)
    sample = (sample_text(self.spec, self.data, latest, t.sample_tokens, self.device, self.autocast, t.seed, self.seq_len)
              if t.sample_tokens and latest is not None and self.num_params <= SAMPLE_MAX_PARAMS else None)
    measured = median_step_time(self.metrics.records) if self.metrics is not None else None
    if last_loss is None and self.metrics is not None and self.metrics.records:  # resumed at the end
        last_loss = self.metrics.records[-1].get("loss")
    e = self.prediction
    predicted = e.step_time_s if e is not None else None
    explain = (predict.explain(self.cfg, self.spec, self.plan, self.hardware, self.device.type,
                               self.env.local_world_size) if e is not None and self.hardware is not None else None)
    return {
        "ended": ended,
        "error": error,
        "plan": self.plan.to_dict(),
        "world_size": self.env.world_size,
        "device": self.device.type,
        "model": self.spec.name,
        "params": self.num_params,
        "steps": t.steps,
        "last_step": self.step,
        "seq_len": self.seq_len,
        "global_batch": t.global_batch,
        "hardware": self.cfg.parallel.hardware or None,
        "predicted_step_time_s": predicted,
        "measured_step_time_s": measured,
        "prediction_error": measured / predicted - 1 if measured and predicted else None,
        "predicted_breakdown": e.breakdown if e is not None else None,
        "predicted_memory_mib_per_rank": e.memory_gib_per_device * 1024 if e is not None else None,
        **corrected(self.metrics.records if self.metrics is not None else []),
        "tokens_per_s": self.items_per_step / measured if measured else None,
        "mfu": self._mfu(measured) if measured else None,
        "hfu": self._mfu(measured) * self.hfu_ratio if measured and self.peak_tflops else None,
        "peak_tflops": self.peak_tflops,
        "final_loss": last_loss,
        "final_val_loss": val_loss,
        "final_val_loss_per_byte": val_loss / self.data.bytes_per_token
        if val_loss is not None and self.data.bytes_per_token else None,
        "wall_s": wall_s,
        **recovery(self.history),
        "bad_steps": self.bad.seen,
        "final_params_sha256": params_sha256(latest) if latest is not None else None,
        "memory_mib_per_rank": getattr(self, "memory_mib", None),  # None when resumed past step 1
        "sample": sample,
        "explain": explain,
    }

