"""`zhilu plan`: the JSON contract, the table, one-line errors, and a cold start without torch."""

import argparse
import json
import subprocess
import sys

import pytest

from zhilu.errors import ZhiluError
from zhilu.perf import plan_cli
from zhilu.perf.software import STACKS
from zhilu.plan import Plan

PLAN_KEYS = {"plan", "dp", "tp", "pp", "zero", "sp", "micro_batch", "mb", "schedule", "vstages", "recompute",
             "precision", "step_time_s", "tokens_per_s", "model_tflops_per_gpu", "mfu", "peak_tflops",
             "memory_gib_per_device", "fits", "breakdown", "error_band"}
BREAKDOWN_KEYS = {"compute", "recompute", "tp_comm", "pp_comm", "dp_comm_exposed", "bubble", "optimizer", "other"}
JOB = ["--model", "llama3-8b", "--seq-len", "4096", "--global-batch", "64", "--gpus", "16", "--hardware", "h100-sxm"]


def plan(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="zhilu plan")
    plan_cli.add_arguments(parser)
    return plan_cli.run(parser.parse_args(list(argv)))


def test_json_is_the_contract(capsys):
    assert plan(*JOB, "--json", "--top", "3") == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"plans", "best", "software"} and out["best"] == 0 and out["software"] == "zhilu"
    assert 1 <= len(out["plans"]) <= 3
    for p in out["plans"]:
        assert set(p) == PLAN_KEYS and set(p["breakdown"]) == BREAKDOWN_KEYS
        assert p["fits"] and p["dp"] * p["tp"] * p["pp"] == 16
        assert p["micro_batch"] * p["mb"] * p["dp"] == 64  # sequences per micro-batch, micro-batches, replicas
        assert sum(p["breakdown"].values()) == pytest.approx(p["step_time_s"])
        assert p["peak_tflops"] == 989 and p["mfu"] == pytest.approx(p["model_tflops_per_gpu"] / p["peak_tflops"])
        band = p["error_band"]  # from the published runs of its regime (zhilu.perf.confidence)
        assert set(band) == {"low_s", "high_s", "rows", "regime"} and band["rows"] >= 5
        assert band["low_s"] < band["high_s"]
    times = [p["step_time_s"] for p in out["plans"]]
    assert times == sorted(times)


def test_each_plan_comes_with_the_spec_that_trains_it(capsys):
    plan(*JOB, "--json", "--top", "5", "--pp", "2")
    for p in json.loads(capsys.readouterr().out)["plans"]:
        parsed = Plan.parse(p["plan"], 16).to_dict()  # what zhilu train --plan reads
        shared = parsed.keys() & p.keys()
        assert shared >= {"dp", "tp", "pp", "zero", "sp", "mb", "schedule", "vstages", "recompute", "precision"}
        assert {k: parsed[k] for k in shared} == {k: p[k] for k in shared}
        assert p["precision"] == "bf16"  # resolved for the H100, not "auto"


def test_given_degrees_give_exactly_that_plan(capsys):
    plan(*JOB, "--json", "--dp", "2", "--tp", "8", "--pp", "1", "--zero", "1", "--micro-batch", "4",
         "--schedule", "1f1b", "--recompute", "selective")
    (p,) = json.loads(capsys.readouterr().out)["plans"]
    assert (p["dp"], p["tp"], p["pp"], p["zero"], p["micro_batch"], p["recompute"]) == (2, 8, 1, 1, 4, "selective")
    assert p["mb"] == 8  # 32 sequences per replica in micro-batches of 4


@pytest.mark.parametrize("name", list(STACKS))
def test_each_software_profile_predicts_for_its_own_stack(name, capsys):
    given = ["--dp", "2", "--tp", "8", "--pp", "1", "--zero", "0", "--micro-batch", "1", "--recompute", "none"]
    plan(*JOB, *given, "--json", "--software", name)
    out = json.loads(capsys.readouterr().out)
    assert out["software"] == name
    (p,) = out["plans"]
    plan(*JOB, *given, "--json")
    (zhilu_own,) = json.loads(capsys.readouterr().out)["plans"]
    if STACKS[name].tp_overlap:  # tensor-parallel collectives under the products
        assert p["breakdown"]["tp_comm"] < zhilu_own["breakdown"]["tp_comm"]
    if STACKS[name].foreach_adamw:  # PyTorch's multi-tensor AdamW moves more bytes than a fused one
        assert p["breakdown"]["optimizer"] > zhilu_own["breakdown"]["optimizer"]
    if not STACKS[name].dp_overlap:  # gradients reduced after backward, none hidden (per byte: fp16 halves them)
        assert p["breakdown"]["dp_comm_exposed"] * 4 / STACKS[name].grad_reduce_bytes > \
            zhilu_own["breakdown"]["dp_comm_exposed"]
    if name == "zhilu":
        assert p == zhilu_own


def test_a_model_by_shape_and_the_time_to_train(capsys):
    plan("--layers", "4", "--hidden", "256", "--heads", "4", "--vocab", "1000", "--seq-len", "256",
         "--global-batch", "8", "--gpus", "2", "--hardware", "cpu", "--json", "--tokens", "1e6")
    p = json.loads(capsys.readouterr().out)["plans"][0]
    assert p["time_to_train_s"] == pytest.approx(1e6 / p["tokens_per_s"])
    assert p["device_hours"] == pytest.approx(p["time_to_train_s"] * 2 / 3600)
    assert p["energy_kwh"] == pytest.approx(p["device_hours"] * 60 / 1000)
    assert p["error_band"] is None  # the published runs are all on accelerators


def test_the_table_fits_100_columns_and_gives_each_row_its_spec(capsys):
    assert plan("--layers", "128", "--hidden", "25600", "--heads", "160", "--vocab", "51200", "--seq-len", "2048",
                "--global-batch", "1536", "--gpus", "3072", "--hardware", "a100-80gb", "--top", "3",
                "--tokens", "1e12") == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "GiB/dev" in out and "device-hours" in out and "MWh" in out
    table = out[:out.index("b x mb:")].splitlines()
    assert max(map(len, table)) <= 100
    rows = [line for line in table if line[:3].strip().isdigit()]
    assert len(rows) == 3  # one line each
    specs = out[out.index("zhilu train --plan SPEC for each row"):].splitlines()[1:4]
    assert [line.split()[0] for line in specs] == ["1", "2", "3"]
    assert all(Plan.parse(line.split()[1], 3072).world_size == 3072 for line in specs)


@pytest.mark.parametrize("argv,field", [
    (["--model", "gpt-tiny", "--seq-len", "256", "--global-batch", "8", "--gpus", "4", "--hardware", "cpu",
      "--tp", "4"], "tp"),  # 6 heads
    ([*JOB[:-1], "tpu-v5"], "hardware"),
    (["--model", "llama3-8b", "--seq-len", "4096", "--global-batch", "64", "--gpus", "0", "--hardware", "h100-sxm"],
     "gpus"),
    (["--model", "llama3-70b", "--seq-len", "8192", "--global-batch", "8", "--gpus", "1", "--hardware", "a100-40gb"],
     "plan"),  # nothing fits
    (["--layers", "4", "--hidden", "256", "--seq-len", "256", "--global-batch", "8", "--gpus", "2",
      "--hardware", "cpu"], "model"),  # heads and vocabulary missing
    (["--model", "llama-2b", *JOB[2:]], "model.preset"),
    (JOB[:-2], "hardware"),
    ([*JOB, "--micro-batch", "0"], "micro_batch"),
    ([*JOB, "--tokens", "-5"], "tokens"),
    ([*JOB, "--software", "alpa"], "software"),  # not a profile
])
def test_bad_input_is_a_user_error_naming_the_field(argv, field):
    with pytest.raises(ZhiluError) as e:
        plan(*argv)
    assert e.value.field == field


def test_plan_answers_from_a_cold_start_without_torch_or_numpy():
    code = ("import argparse, sys; from zhilu.perf import plan_cli; p = argparse.ArgumentParser(); "
            "plan_cli.add_arguments(p); plan_cli.run(p.parse_args(sys.argv[1:])); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'imported torch or numpy'")
    done = subprocess.run([sys.executable, "-c", code, *JOB, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["best"] == 0
