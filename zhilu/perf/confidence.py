"""How far to trust a prediction: the spread of the model's error on published runs of its kind.

A plan's regime is its strategy (``dp``: data parallel without full sharding, ``fsdp``:
ZeRO-3 data parallel alone, ``tp``: tensor parallel without a pipeline, ``pp``: any plan with
a pipeline), its scale (devices: ``1-8``, ``9-64``, ``65-512``, ``513+``) and the software
stack. :data:`zhilu.perf.error_bands.RATIOS` holds, for each regime that published runs
cover, the ratios published / predicted step time of those runs (written by
``python benchmarks/published.py --write-bands``; a test keeps it equal to what that
benchmark computes). :func:`band` turns them into the range the middle 80% of those runs fell
in, around a new prediction, from the narrowest regime with at least :data:`MIN_ROWS` runs:
stack, strategy and scale; else strategy and scale; else strategy. Pure Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import quantiles

from zhilu.plan import Plan

MIN_ROWS = 5  # fewer published runs than this say too little about a regime's spread
SCALES = ((8, "1-8"), (64, "9-64"), (512, "65-512"))


@dataclass(frozen=True)
class Band:
    """Where the middle 80% of the published runs of ``regime`` fell, scaled to one prediction."""

    low_s: float
    high_s: float
    rows: int  # published runs the band comes from
    regime: str  # which: "fsdp, 65-512 devices, software fsdp", or fewer parts

    def as_dict(self) -> dict[str, object]:
        return {"low_s": self.low_s, "high_s": self.high_s, "rows": self.rows, "regime": self.regime}


def strategy(plan: Plan) -> str:
    if plan.pp > 1:
        return "pp"
    if plan.tp > 1:
        return "tp"
    return "fsdp" if plan.zero == 3 else "dp"


def scale(devices: int) -> str:
    return next((name for top, name in SCALES if devices <= top), "513+")


def regime(plan: Plan, software: str) -> str:
    """The key of ``plan``'s regime in :data:`zhilu.perf.error_bands.RATIOS`."""
    return f"{strategy(plan)}, {scale(plan.dp * plan.tp * plan.pp)} devices, software {software}"


def band(plan: Plan, step_time_s: float, software: str,
         table: Mapping[str, Sequence[float]] | None = None) -> Band | None:
    """The range around ``step_time_s`` that the published runs of ``plan``'s regime support,
    or None where fewer than :data:`MIN_ROWS` published runs share even its strategy.
    ``table``: regime -> published / predicted ratios (default :data:`zhilu.perf.error_bands.RATIOS`)."""
    if table is None:
        from zhilu.perf.error_bands import RATIOS as table

    key = regime(plan, software)
    for parts in (3, 2, 1):
        prefix = ", ".join(key.split(", ")[:parts])
        ratios = [r for k, rs in table.items() if k == prefix or k.startswith(prefix + ", ") for r in rs]
        if len(ratios) >= MIN_ROWS:
            deciles = quantiles(ratios, n=10, method="inclusive")
            return Band(step_time_s * deciles[0], step_time_s * deciles[-1], len(ratios), prefix)
    return None
