"""Data parallelism computes what one process computes.

Every layout trains the same micro GPT for 10 steps on the same global batch of 8
sequences and seed: its per-step losses and final parameters must equal the
single-process run (fp32 on CPU: losses within a relative 1e-5, parameters within 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MICRO, assert_same_run, losses, train, zhilu
from zhilu.training.checkpoint import latest_checkpoint

STEPS = ["--steps", "10", "--global-batch", "8"]


def run(out: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    return train(out, *STEPS, *args, env=env)


def assert_same(run_dir: Path, reference: Path) -> None:
    assert_same_run(run_dir, reference, steps=10, n_layers=2)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("single") / "run")


@pytest.mark.parametrize(
    "plan",
    ["dp=2", "dp=2,zero=1,mb=2", "dp=2,zero=2", "dp=2,zero=3", "dp=2,mb=2"],
    ids=["ddp", "zero1-accumulate", "zero2", "zero3", "ddp-accumulate"],
)
def test_two_ranks_match_one_process(plan: str, single_process: Path, tmp_path: Path) -> None:
    assert_same(run(tmp_path / "run", "--nproc", "2", "--plan", plan), single_process)


def test_gradient_accumulation_equals_the_larger_batch(single_process: Path, tmp_path: Path) -> None:
    assert_same(run(tmp_path / "run", "--plan", "mb=4"), single_process)


def test_losses_fall_and_differ_by_seed(single_process: Path, tmp_path: Path) -> None:
    trace = losses(single_process)
    assert trace[-1] < trace[0] - 0.25
    other = losses(run(tmp_path / "run", "--seed", "1"))
    assert other != trace


def test_resume_after_a_crash_continues_the_same_trajectory(single_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    crashed = zhilu("train", *MICRO, *STEPS, "--out", str(out), "--checkpoint-every", "5",
                    env={"ZHILU_FAIL_AT_STEP": "7"})
    assert crashed.returncode == 1
    assert "simulated crash" in crashed.stderr
    assert latest_checkpoint(out).name == "step-00000005"
    run(out, "--checkpoint-every", "5", "--resume")
    assert_same(out, single_process)


def test_restart_after_a_crash_on_two_ranks(single_process: Path, tmp_path: Path) -> None:
    out = run(tmp_path / "run", "--nproc", "2", "--checkpoint-every", "3", "--max-restarts", "1",
              env={"ZHILU_FAIL_AT_STEP": "5"})
    assert_same(out, single_process)
    assert json.loads((out / "summary.json").read_text())["restarts"] == 1
