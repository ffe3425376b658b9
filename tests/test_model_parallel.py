"""Tensor, pipeline and hybrid plans compute exactly what one process computes.

Every layout trains the same 4-layer micro GPT for 5 steps on the same global batch and
seed. Its per-step losses, and its final parameters gathered from the checkpoint, must equal
the single-process run's (fp32 on CPU: losses within a relative 1e-5, parameters within
1e-5; see conftest.assert_same_run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_same_run, losses, train

JOB = ["--model.n_layers", "4", "--steps", "5", "--global-batch", "8"]


def run(out: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    return train(out, *JOB, *args, env=env)


def assert_same(run_dir: Path, reference: Path) -> None:
    assert_same_run(run_dir, reference, steps=5, n_layers=4)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("single") / "run")


LAYOUTS = {
    "tp": (2, "tp=2"),
    "tp-sp": (2, "tp=2,sp=true"),
    "pp-gpipe": (2, "pp=2,mb=4,schedule=gpipe"),
    "pp-1f1b": (2, "pp=2,mb=4,schedule=1f1b"),
    "pp-interleaved": (2, "pp=2,mb=4,schedule=interleaved,vstages=2"),
    "tp-selective-recompute": (2, "tp=2,recompute=selective"),
    "tp-full-recompute": (2, "tp=2,recompute=full"),
    "dp-tp-zero3": (4, "dp=2,tp=2,zero=3"),
    "dp-pp": (4, "dp=2,pp=2,mb=2"),
    "tp-pp": (4, "tp=2,pp=2,mb=2"),
}


@pytest.mark.parametrize("nproc, plan", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_matches_one_process(nproc: int, plan: str, single_process: Path, tmp_path: Path) -> None:
    assert_same(run(tmp_path / "run", "--nproc", str(nproc), "--plan", plan), single_process)


@pytest.mark.parametrize("plan", ["tp=2", "pp=2"])
def test_each_rank_holds_about_half_the_parameters(plan: str, tmp_path: Path) -> None:
    out = run(tmp_path / "run", "--nproc", "2", "--plan", plan, "--steps", "1")
    summary = json.loads((out / "summary.json").read_text())
    whole = summary["params"] * 4 / 2**20  # fp32 MiB
    for rank in summary["memory_mib_per_rank"]:
        assert 0.4 < rank["params"] / whole < 0.6, rank
        assert rank["optimizer"] == pytest.approx(2 * rank["params"], rel=0.01)  # AdamW: two moments


def test_model_averaging_trains_replicas_apart(single_process: Path, tmp_path: Path) -> None:
    trace = losses(run(tmp_path / "run", "--nproc", "2", "--plan", "dp=2,avg_every=2"))
    assert trace[-1] < trace[0]
    assert trace != losses(single_process)  # AdamW replicas that average parameters are not DDP


def test_gradient_clipping_takes_effect(single_process: Path, tmp_path: Path) -> None:
    unclipped = losses(run(tmp_path / "run", "--train.grad_clip", "0"))
    assert unclipped != losses(single_process)
