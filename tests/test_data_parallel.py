"""Data parallelism computes what one process computes.

Every layout trains the same micro GPT for 10 steps on the same global batch of 8
sequences and seed: its per-step losses and final parameters must equal the
single-process run (fp32 on CPU, relative difference <= 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import MICRO, losses, zhilu
from zhilu.models.gpt import build_model
from zhilu.models.presets import preset
from zhilu.train.checkpoint import latest_checkpoint, load_model

STEPS = ["--steps", "10", "--global-batch", "8"]
RTOL = 1e-5


def train(out: Path, *extra: str, env: dict[str, str] | None = None) -> Path:
    result = zhilu("train", *MICRO, *STEPS, "--out", str(out), *extra, env=env)
    assert result.returncode == 0, result.stderr
    return out


def final_params(out: Path) -> dict[str, torch.Tensor]:
    model = build_model(preset("gpt-tiny", n_layers=2, hidden=64, n_heads=4, ffn_hidden=128), seed=123)
    load_model(latest_checkpoint(out), model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = losses(run), losses(reference)
    assert len(got) == len(want) == 10
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=0)
    params, ref_params = final_params(run), final_params(reference)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=RTOL, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("single") / "run")


@pytest.mark.parametrize(
    "plan",
    ["dp=2", "dp=2,zero=1,mb=2", "dp=2,zero=2", "dp=2,zero=3", "dp=2,mb=2"],
    ids=["ddp", "zero1-accumulate", "zero2", "zero3", "ddp-accumulate"],
)
def test_two_ranks_match_one_process(plan: str, single_process: Path, tmp_path: Path) -> None:
    run = train(tmp_path / "run", "--nproc", "2", "--plan", plan)
    assert_same_run(run, single_process)


def test_gradient_accumulation_equals_the_larger_batch(single_process: Path, tmp_path: Path) -> None:
    run = train(tmp_path / "run", "--plan", "mb=4")
    assert_same_run(run, single_process)


def test_losses_fall_and_differ_by_seed(single_process: Path, tmp_path: Path) -> None:
    trace = losses(single_process)
    assert trace[-1] < trace[0] - 0.25
    other = losses(train(tmp_path / "run", "--seed", "1"))
    assert other != trace


def test_resume_after_a_crash_continues_the_same_trajectory(single_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    crashed = zhilu("train", *MICRO, *STEPS, "--out", str(out), "--checkpoint-every", "5",
                    env={"ZHILU_FAIL_AT_STEP": "7"})
    assert crashed.returncode == 1
    assert "simulated crash" in crashed.stderr
    assert latest_checkpoint(out).name == "step-00000005"
    train(out, "--checkpoint-every", "5", "--resume")
    assert_same_run(out, single_process)


def test_restart_after_a_crash_on_two_ranks(single_process: Path, tmp_path: Path) -> None:
    run = train(tmp_path / "run", "--nproc", "2", "--checkpoint-every", "3", "--max-restarts", "1",
                env={"ZHILU_FAIL_AT_STEP": "5"})
    assert_same_run(run, single_process)
    import json

    assert json.loads((run / "summary.json").read_text())["restarts"] == 1
