"""Data parallelism computes what one process computes.

Every layout trains the same micro GPT for 10 steps on the same global batch of 8
sequences and seed: its per-step losses and final parameters must equal the
single-process run (fp32 on CPU: losses within a relative 1e-5, parameters within 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_same_run, losses, train

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
