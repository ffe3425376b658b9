"""The examples run as their docstrings say and check what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_linear_regression_fits_the_line_three_ways_through_zhilu() -> None:
    result = subprocess.run([sys.executable, "examples/linear_regression.py", "--points", "200000"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in result.stdout.splitlines()
            if line.startswith(("data parallel", "model averaging", "hybrid"))}
    assert set(rows) == {"data parallel", "model averaging", "hybrid dp=4,avg_every=8,avg_groups=2"}
    for cells in rows.values():
        slope, intercept = float(cells[-4]), float(cells[-3])
        assert abs(slope - 2.0) <= 0.02 and abs(intercept - 0.5) <= 0.02, cells
    assert "within 0.02: yes" in result.stdout
