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
    assert "Warning" not in result.stderr, result.stderr


def test_help_lists_every_setting_with_its_default() -> None:
    from zhilu.config import settings_help

    result = zhilu("train", "--help")
    assert result.returncode == 0
    for key, text, default in settings_help():
        assert f"--{key} " in result.stdout and text.split(";")[0][:30] in " ".join(result.stdout.split()), key
    assert "--train.lr 0.003" in result.stdout and "--model.name 'gpt-tiny'" in result.stdout


def test_dry_run_checks_and_prints_without_writing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = zhilu("train", "--dry-run", "--plan", "dp=2,zero=3", "--steps", "7", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "steps = 7" in result.stdout and 'plan = "dp=2,zero=3"' in result.stdout and "nproc = 2" in result.stdout
    assert "# data: python" in result.stdout and "standard library" in result.stdout
    assert "training and" in result.stdout and "# predicted" in result.stdout
    assert not out.exists()
    bad = zhilu("train", "--dry-run", "--plan", "dp=2,tp=5", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.startswith("error: parallel.plan")
    auto = zhilu("train", "--dry-run", "--plan", "auto", "--parallel.hardware", "cpu", "--nproc", "2", "--out", str(out))
    assert auto.returncode == 0 and "plan auto: dp=2," in auto.stdout, auto.stderr
    no_shape = zhilu("train", "--dry-run", "--model", "examples/my_model.py:spec", "--plan", "auto",
                     "--parallel.hardware", "cpu", "--out", str(out))
    assert no_shape.returncode == 2 and "auto needs the model's transformer shape" in no_shape.stderr
    assert not out.exists()


def test_the_plan_sets_the_process_count_on_cpu_and_torch_warns_of_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = zhilu("train", "--plan", "dp=2,zero=3", "--steps", "2", "--seq-len", "32", "--global-batch", "4",
                   "--train.sample_tokens", "0", "--train.eval_batches", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "Warning" not in result.stderr, result.stderr
    # one MFU: model FLOPs over the peak of the hardware the run predicts on, as zhilu plan computes it
    from zhilu.hardware import cluster
    from zhilu.mfu import mfu
    from zhilu.models.presets import preset

    peak = cluster(summary["hardware"]).device.peak_tflops["fp32"]
    assert summary["peak_tflops"] == peak
    flops = preset("gpt-tiny").flops_per_token(32)
    assert summary["mfu"] == pytest.approx(mfu(flops, summary["tokens_per_s"], 2, peak)) and 0 < summary["mfu"] < 1
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["mfu"] == pytest.approx(mfu(flops, record["tokens_per_s"], 2, peak))
