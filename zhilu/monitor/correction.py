"""The prediction corrected by the run's own first steps.

The performance model predicts a step before it runs (``predicted`` in metrics.jsonl); the step
clock measures it (``breakdown``). The two split a step differently where a measurement cannot
see a model term on its own: tensor-parallel traffic runs inside the forward and backward unless
it is timed apart (``--metrics.tp_comm``), and a pipeline stage sees its transfers and its bubble
as one wait. :data:`GROUPS` pairs the model's terms with the measured ones; each group's factor
(measured over predicted, over the first :data:`STEPS` steps but the first) re-fits the model's
terms in it, and the corrected prediction is the predicted breakdown so re-fitted: what the rest
of the run should take if the machine keeps the speed it showed. A term the model does not
predict (the data wait) enters as measured. Pure Python.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

STEPS = 10  # the steps the correction is fitted on (the first left out: start-up, compilation)

# group: (the model's terms, the measured terms); tensor-parallel traffic in the compute's
# unless it was measured apart (:func:`groups`)
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "compute": (("compute", "tp_comm"), ("forward", "backward")),
    "recompute": (("recompute",), ("recompute",)),
    "pipeline": (("pp_comm", "bubble"), ("pipeline",)),
    "dp_comm": (("dp_comm_exposed",), ("dp_comm_exposed",)),
    "optimizer": (("optimizer",), ("optimizer",)),
    "other": (("other",), ("data", "other")),
}


@dataclass(frozen=True)
class Correction:
    """``factors``: measured over predicted seconds per group (None where the model predicts none
    of it); ``breakdown``: the model's terms re-fitted, seconds per step; ``step_time_s``: their sum."""

    factors: dict[str, float | None]
    breakdown: dict[str, float]

    @property
    def step_time_s(self) -> float:
        return sum(self.breakdown.values())


def groups(measured: dict[str, float]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """:data:`GROUPS`, with tensor-parallel traffic a group of its own where it was measured apart."""
    if "tp_comm" not in measured:
        return GROUPS
    return {**GROUPS, "compute": (("compute",), ("forward", "backward")), "tp_comm": (("tp_comm",), ("tp_comm",))}


def correct(predicted: dict[str, float], measured: dict[str, float]) -> Correction:
    """Re-fit each group of ``predicted`` terms to the ``measured`` seconds of its group."""
    factors: dict[str, float | None] = {}
    breakdown: dict[str, float] = {}
    for group, (model_terms, measured_terms) in groups(measured).items():
        model_s = sum(predicted.get(t, 0.0) for t in model_terms)
        measured_s = sum(measured.get(t, 0.0) for t in measured_terms)
        if model_s > 0:
            factors[group] = measured_s / model_s
            breakdown.update({t: predicted.get(t, 0.0) * factors[group] for t in model_terms})
        else:
            factors[group] = None
            breakdown[model_terms[0]] = measured_s
    return Correction(factors, breakdown)


def fitted_on(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metrics.jsonl records the correction is fitted on: those up to step :data:`STEPS` but
    the first (which holds step 1) where there are others, or none before the run reached them."""
    first = [r for r in records if r["step"] <= STEPS and "breakdown" in r]
    if not first or first[-1]["step"] < STEPS:
        return []
    return first[1:] if len(first) > 1 else first


def from_records(records: list[dict[str, Any]]) -> Correction | None:
    """The correction of a run's prediction from its first steps; None without a prediction or
    before step :data:`STEPS`."""
    fitted = fitted_on(records)
    if not fitted or "predicted" not in fitted[-1]:
        return None
    terms = {t for r in fitted for t in r["breakdown"]}
    measured = {t: statistics.median(r["breakdown"].get(t, 0.0) for r in fitted) for t in terms}
    return correct(fitted[-1]["predicted"], measured)
