"""Error bands: a prediction's range comes from the published runs of its regime, the narrowest
one with enough runs, and holds the middle 80% of their published / predicted ratios."""

from __future__ import annotations

import math

import pytest

from zhilu.perf.confidence import MIN_ROWS, band, regime
from zhilu.perf.error_bands import RATIOS
from zhilu.plan import Plan


def test_the_regime_names_strategy_scale_and_software():
    assert regime(Plan(dp=64, zero=3), "fsdp") == "fsdp, 9-64 devices, software fsdp"
    assert regime(Plan(dp=2, zero=1), "zhilu") == "dp, 1-8 devices, software zhilu"
    assert regime(Plan(dp=24, tp=8, pp=16), "megatron") == "pp, 513+ devices, software megatron"
    assert regime(Plan(dp=16, tp=8), "torchtitan") == "tp, 65-512 devices, software torchtitan"


def test_the_band_holds_the_middle_80_percent_of_its_regimes_runs():
    ratios = RATIOS["fsdp, 9-64 devices, software fsdp"]
    assert len(ratios) >= MIN_ROWS
    b = band(Plan(dp=64, zero=3), 10.0, "fsdp")
    assert b.regime == "fsdp, 9-64 devices, software fsdp" and b.rows == len(ratios)
    n = len(ratios)  # the 10th and 90th percentiles, interpolated between the runs they fall between
    inside = sum(b.low_s <= 10.0 * r <= b.high_s for r in ratios)
    assert inside == math.floor(0.9 * (n - 1)) - math.ceil(0.1 * (n - 1)) + 1
    assert 10.0 * min(ratios) < b.low_s < b.high_s < 10.0 * max(ratios)
    assert band(Plan(dp=64, zero=3), 20.0, "fsdp").high_s == pytest.approx(2 * b.high_s)


def test_a_regime_with_few_runs_borrows_from_its_strategy_and_scale_then_its_strategy():
    # zhilu's own runtime has no published runs: the runs of other stacks with the same strategy and scale
    b = band(Plan(dp=64, zero=3), 1.0, "zhilu")
    assert b.regime == "fsdp, 9-64 devices"
    assert b.rows == sum(len(v) for k, v in RATIOS.items() if k.startswith("fsdp, 9-64 devices, "))
    enough = [1.0 + i / 100 for i in range(MIN_ROWS)]
    table = {"tp, 65-512 devices, software megatron": enough[:2],  # too few at this scale
             "tp, 9-64 devices, software megatron": enough[2:]}
    tp = Plan(dp=16, tp=8)
    assert band(tp, 1.0, "megatron", table).regime == "tp" and band(tp, 1.0, "megatron", table).rows == MIN_ROWS
    table["tp, 65-512 devices, software torchtitan"] = enough
    assert band(tp, 1.0, "megatron", table).regime == "tp, 65-512 devices"
    assert band(tp, 1.0, "torchtitan", table).regime == "tp, 65-512 devices, software torchtitan"


def test_no_band_without_enough_published_runs_of_the_strategy():
    few = {"dp, 1-8 devices, software ddp": [1.0] * (MIN_ROWS - 1), "tp, 1-8 devices, software ddp": [1.0] * 20}
    assert band(Plan(dp=2, zero=1), 1.0, "zhilu", few) is None
    few["dp, 9-64 devices, software ddp"] = [1.1]
    assert band(Plan(dp=2, zero=1), 1.0, "zhilu", few) is not None
