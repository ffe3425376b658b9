"""A training job as the performance model sees it: plan conversion, prediction, `--plan auto`, explain."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from conftest import MICRO, zhilu
from zhilu import hardware
from zhilu.models.presets import preset
from zhilu.perf import job
from zhilu.perf.comm import collective_seconds
from zhilu.plan import Plan

TINY = preset("gpt-tiny")
CPU = hardware.PRESETS["cpu"]


@pytest.mark.parametrize("spec", ["dp=2,zero=3,mb=2", "tp=2,sp=true", "pp=2,mb=4,schedule=gpipe",
                                  "pp=2,mb=4,schedule=interleaved,vstages=2", "dp=2,pp=2,mb=2,recompute=full"])
def test_the_model_predicts_the_training_plan_itself(spec: str) -> None:
    plan = Plan.parse(spec, _world(spec))
    e = job.predict(TINY, 256, 16, plan, CPU, "cpu")
    assert e.micro_batch * plan.mb * plan.dp == 16  # sequences per micro-batch x micro-batches x replicas
    assert e.plan == plan.resolved("cpu") and e.plan.precision == "fp32"  # auto: what zhilu trains in on a CPU
    assert Plan.parse(plan.spec(), plan.world_size) == plan


def _world(spec: str) -> int:
    degrees = dict(item.split("=") for item in spec.split(","))
    return math.prod(int(degrees.get(k, 1)) for k in ("dp", "tp", "pp"))


def test_model_averaging_replaces_gradient_traffic_by_an_average_every_h_steps() -> None:
    every_step = job.predict(TINY, 256, 16, Plan(dp=2), CPU, "cpu")
    averaged = job.predict(TINY, 256, 16, Plan(dp=2, avg_every=8), CPU, "cpu")
    with_moments = job.predict(TINY, 256, 16, Plan(dp=2, avg_every=8), CPU, "cpu", average_optimizer_state=True)
    assert averaged.breakdown["dp_comm_exposed"] < every_step.breakdown["dp_comm_exposed"]
    weights = TINY.num_params() * 4  # fp32 bytes, all-reduced over the 2 replicas every 8 steps
    assert averaged.breakdown["dp_comm_exposed"] == pytest.approx(
        collective_seconds("all_reduce", weights, 2, 2, CPU.sized(2)) / 8)
    assert with_moments.breakdown["dp_comm_exposed"] == pytest.approx(  # AdamW's two moments too
        collective_seconds("all_reduce", 3 * weights, 2, 2, CPU.sized(2)) / 8)
    assert sum(averaged.breakdown.values()) == pytest.approx(averaged.step_time_s)


def test_auto_is_the_fastest_runnable_plan_that_fits() -> None:
    plans = job.candidates(TINY, 256, 16, 4, CPU, "cpu")
    plan, e, _ = job.auto(TINY, 256, 16, 4, CPU, "cpu")
    assert e.step_time_s == min(c[1].step_time_s for c in plans) and e.fits
    for p, e in plans:  # every candidate is one zhilu accepts, predicted in what it trains in
        p.validate(4), p.check_model(TINY), p.check_batch(16)
        assert p.precision == "auto" and e.plan == p.resolved("cpu")


def test_auto_names_the_faster_plans_it_cannot_run_and_the_runners_up() -> None:
    plan, e, lines = job.auto(TINY, 256, 16, 4, CPU, "cpu")
    ms = [float(line.split("(")[1].split(" ms/step")[0].replace(",", "")) for line in lines]
    over = [line for line in lines if line.startswith("passed over ")]
    runners = [line for line in lines if line.startswith("runner-up ")]
    assert len(over) + len(runners) == len(lines) and 1 <= len(runners) <= 2
    assert all(": " in line for line in over)  # each says why zhilu cannot run it
    assert all(t <= e.step_time_s * 1e3 + 0.5 for t in ms[:len(over)])
    assert all(t >= e.step_time_s * 1e3 - 0.5 for t in ms[len(over):])
    assert plan.spec() not in [line.split()[1] for line in runners]


def test_hybrid_averaging_reduces_within_groups_and_averages_across_them() -> None:
    plain = job.predict(TINY, 256, 16, Plan(dp=4, avg_every=4), CPU, "cpu")
    hybrid = job.predict(TINY, 256, 16, Plan(dp=4, avg_every=4, avg_groups=2), CPU, "cpu")
    c = CPU.sized(4)
    weights = TINY.num_params() * 4
    average = collective_seconds("all_reduce", weights, 2, 1, c) / 4  # 2 groups of 2, one member each per node
    assert plain.breakdown["dp_comm_exposed"] == pytest.approx(collective_seconds("all_reduce", weights, 4, 2, c) / 4)
    assert hybrid.breakdown["dp_comm_exposed"] > average  # and each group's gradients every step
    assert sum(hybrid.breakdown.values()) == pytest.approx(hybrid.step_time_s)


def test_explain_names_the_largest_term_and_a_faster_plan() -> None:
    slow = Plan(pp=2, mb=2)  # half the step idle in the bubble
    x = job.explain(TINY, 256, 16, slow, CPU, "cpu")
    e = job.predict(TINY, 256, 16, slow, CPU, "cpu")
    assert x["dominating"] == max(e.breakdown, key=e.breakdown.get)
    best_plan, best, _ = job.auto(TINY, 256, 16, 2, CPU, "cpu")
    assert x["switch_to"]["plan"] == best_plan.spec()
    assert x["switch_to"]["predicted_speedup"] == pytest.approx(e.step_time_s / best.step_time_s)
    assert job.explain(TINY, 256, 16, best_plan, CPU, "cpu")["switch_to"] is None


def test_train_plan_auto_calibrates_once_predicts_and_reports(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    result = zhilu("train", *MICRO, "--nproc", "2", "--plan", "auto", "--steps", "4", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    calibration = tmp_path / "cache" / "zhilu" / "hardware-cpu-2.toml"
    assert "calibrating this machine" in result.stdout and calibration.exists()
    config = tomllib.loads((out / "config.toml").read_text())
    chosen = Plan.parse(config["parallel"]["plan"], 2)  # the plan that ran, re-runnable
    assert config["parallel"]["hardware"] == str(calibration)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"] == chosen.resolved("cpu").to_dict()  # precision=auto ran as fp32 on a CPU
    assert summary["predicted_step_time_s"] > 0 and summary["measured_step_time_s"] > 0
    assert summary["prediction_error"] == pytest.approx(
        summary["measured_step_time_s"] / summary["predicted_step_time_s"] - 1)
    assert sum(summary["predicted_breakdown"].values()) == pytest.approx(summary["predicted_step_time_s"])
    assert summary["explain"]["dominating"] in summary["predicted_breakdown"]
    assert "predicted" in result.stdout and "ms/step" in result.stdout
    assert "\n  runner-up dp=" in result.stdout  # what --plan auto did not choose

    again = zhilu("train", *MICRO, "--nproc", "2", "--plan", "auto", "--steps", "1", "--out", str(tmp_path / "r2"),
                  env=env)
    assert again.returncode == 0 and "calibrating" not in again.stdout  # measured once, then read
