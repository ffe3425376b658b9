"""Model-parallel plans run end to end from the command line on the default model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import zhilu


@pytest.mark.parametrize("nproc, plan", [("4", "dp=2,tp=2"), ("2", "pp=2,mb=4,schedule=1f1b")])
def test_plan_runs_end_to_end(nproc: str, plan: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = zhilu("train", "--nproc", nproc, "--plan", plan, "--steps", "3", "--seq-len", "64",
                   "--global-batch", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory per rank after step 1" in result.stdout
    assert result.stdout.count("  rank ") == int(nproc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == int(nproc)
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["final_val_loss"])
    assert summary["sample"] and "sample" in result.stdout
