"""A job predicted not to fit in this machine's memory is refused before anything starts, with
the predicted and the available figures; ``--launch.check_memory false`` lets it through."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from conftest import zhilu
from test_cli_errors import assert_one_line_error

FIGURES = re.compile(r"predicted to need ([\d,.]+) GiB .* but ([\d,.]+) GiB is (available|free)")

# A model without a transformer shape, of 10^12 parameters (built on the meta device only).
HUGE = """
import torch
import torch.nn.functional as F
from torch import nn

import zhilu


def data(seed):
    x = torch.zeros(64, 8)
    return (x, torch.zeros(64, dtype=torch.long)), (x, torch.zeros(64, dtype=torch.long))


spec = zhilu.ModelSpec(name="huge", build=lambda: nn.Linear(1_000_000, 1_000_000), loss=F.cross_entropy, dataset=data)
"""


def refused(field: str, *args: str, tmp_path: Path) -> str:
    """``zhilu train ARGS`` refused with one ``error: FIELD`` line whose prediction exceeds what is available."""
    out = tmp_path / "run"
    result = zhilu("train", "--out", str(out), *args)
    assert_one_line_error(result, field)
    found = FIGURES.search(result.stderr)
    assert found, result.stderr
    predicted, available = (float(found.group(i).replace(",", "")) for i in (1, 2))
    assert predicted > available, result.stderr
    assert "--launch.check_memory false" in result.stderr
    assert not out.exists()
    return result.stderr


def test_a_model_too_large_for_this_machine_is_refused(tmp_path: Path) -> None:
    stderr = refused("model.name", "--model", "llama3-70b", tmp_path=tmp_path)
    assert "zhilu's performance model" in stderr


def test_a_huge_global_batch_is_refused_before_its_data_is_built(tmp_path: Path) -> None:
    stderr = refused("train.global_batch", "--global-batch", "100000000", tmp_path=tmp_path)
    assert "100000000 x 256 tokens" in stderr


def test_a_long_sequence_is_refused(tmp_path: Path) -> None:
    refused("train.seq_len", "--seq-len", "500000", "--global-batch", "1", tmp_path=tmp_path)


def test_more_processes_than_memory_for_them_are_refused(tmp_path: Path) -> None:
    stderr = refused("launch.nproc", "--nproc", "512", tmp_path=tmp_path)
    assert "512 processes" in stderr and "for Python and torch (measured in this process)" in stderr


def test_a_model_without_a_shape_is_bounded_from_its_parameters(tmp_path: Path) -> None:
    model = tmp_path / "huge.py"
    model.write_text(textwrap.dedent(HUGE))
    stderr = refused("model.name", "--model", f"{model}:spec", "--dry-run", tmp_path=tmp_path)
    assert "at least: 1,000,001,000,000 parameters' states" in stderr


def test_check_memory_false_lets_the_job_through(tmp_path: Path) -> None:
    result = zhilu("train", "--dry-run", "--launch.check_memory", "false", "--model", "llama3-70b",
                   "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "check_memory = false" in result.stdout and "# predicted" in result.stdout
