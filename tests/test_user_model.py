"""A model of the user's own (examples/my_model.py: an MLP with its own dataset, not a
transformer) trains under data-parallel and ZeRO plans exactly as on one process, and a plan
it does not declare support for is refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import losses, zhilu

import zhilu as api

MODEL = "examples/my_model.py:spec"
JOB = ["--model", MODEL, "--steps", "8", "--global-batch", "16", "--train.log_every", "1",
       "--train.eval_batches", "2"]


def run(out: Path, *args: str) -> Path:
    result = zhilu("train", *JOB, "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("single") / "run")


@pytest.mark.parametrize("plan", ["dp=2", "dp=2,zero=3"], ids=["ddp", "zero3"])
def test_two_ranks_match_one_process(plan: str, single_process: Path, tmp_path: Path) -> None:
    out = run(tmp_path / "run", "--nproc", "2", "--plan", plan)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single_process)), rtol=1e-5, atol=0)
    params, reference = api.load(MODEL, str(out)).state_dict(), api.load(MODEL, str(single_process)).state_dict()
    assert params.keys() == reference.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, reference[name], rtol=0, atol=1e-5, msg=name)


def test_losses_fall(single_process: Path) -> None:
    trace = losses(single_process)
    assert trace[-1] < 0.5 * trace[0]


@pytest.mark.parametrize("plan, declaration", [("tp=2", "tp_plan"), ("pp=2", "pipeline")])
def test_undeclared_parallelism_is_refused(plan: str, declaration: str, tmp_path: Path) -> None:
    result = zhilu("train", *JOB, "--out", str(tmp_path / "run"), "--plan", plan)
    assert result.returncode == 2
    assert result.stderr.startswith("error: parallel.plan: model mlp:") and declaration in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
