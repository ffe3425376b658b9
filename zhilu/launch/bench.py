"""zhilu bench: one job under every strategy on this machine's devices, measured beside predicted.

    zhilu bench                                    # gpt-tiny, 2 processes on a CPU (all GPUs on CUDA)
    zhilu bench --model examples/my_model.py:spec --steps 30 --out runs/bench
    zhilu bench -- --train.seq_len 128             # after --: flags every run gets

Each strategy is a real ``zhilu train`` run of the same model, global batch, seed and steps:
one process, DDP, ZeRO-2, ZeRO-3, tensor parallel, pipeline parallel (1F1B), the plan
``--plan auto`` picks, and model averaging, each predicted on this machine's calibration for
its process count (measured first where there is none). Every step is logged; the first
``--warmup`` are left out and the rest are the repeats whose median and spread (10th-90th
percentile) the table gives, beside the prediction, the speed-up and parallel efficiency
against one process, the peak memory per rank and the final loss. A strategy the model
cannot run is listed with the reason; a model or flag ``zhilu train`` refuses outright is its one
error line, before anything runs. ``report.html`` in the output directory plots it all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zhilu.durable import write_atomic
from zhilu.errors import ZhiluError
from zhilu.launch.run_dir import unwritable


def strategies(n: int) -> list[tuple[str, int, str]]:
    """(name, processes, plan) of each strategy on ``n`` devices, in the order the table shows them."""
    return [("one process", 1, "dp=1"), ("DDP", n, f"dp={n}"), ("ZeRO-2", n, f"dp={n},zero=2"),
            ("ZeRO-3", n, f"dp={n},zero=3"), ("TP", n, f"tp={n}"), ("PP 1F1B", n, f"pp={n},mb={2 * n}"),
            ("auto", n, "auto"), ("model averaging", n, f"dp={n},avg_every=4")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt-tiny", help="any model zhilu train takes (default gpt-tiny)")
    parser.add_argument("--nproc", type=int, default=0, help="devices (default: every GPU; on a CPU, 2 processes)")
    parser.add_argument("--steps", type=int, default=20, help="steps per strategy (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timings (default 5)")
    parser.add_argument("--out", default="", help="output directory (default runs/bench-<time>)")
    parser.add_argument("train_args", nargs="*", help="after --: flags passed to every zhilu train run")


def run(args: argparse.Namespace) -> int:
    import torch

    from zhilu.monitor.report import plotly, write_bench_report

    plotly()  # before any run: the report needs it
    n = args.nproc or torch.cuda.device_count() or 2
    if n < 2:
        raise ZhiluError("--nproc", f"needs 2 or more devices to compare strategies, got {n}")
    if args.steps <= args.warmup or args.warmup < 0:
        raise ZhiluError("--steps", f"must exceed --warmup ({args.warmup}) so some steps are timed, got {args.steps}")
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if problem := unwritable(out, directory=True):
        raise ZhiluError("--out", f"{problem}; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise ZhiluError("--out", f"{out} is not empty; give a new directory")
    common = ["--model", args.model, "--steps", str(args.steps), "--train.log_every", "1", "--train.eval_every", "0",
              "--train.sample_tokens", "0", *args.train_args]
    _check(common, out / _slug("one process"))
    out.mkdir(parents=True, exist_ok=True)
    if not any(a.startswith("--parallel.hardware") for a in args.train_args):
        _calibrate(torch, {1, n})
    rows = {}
    for name, nproc, plan in strategies(n):
        print(f"bench: {name} ({plan}, {nproc} process{'es' if nproc > 1 else ''})", flush=True)
        rows[name] = _run_one(out / _slug(name), nproc, plan, common, args.warmup)
    table = [dict(row, strategy=name) for name, row in rows.items()]
    base = rows["one process"].get("median_s")
    for row in table:
        if base and row.get("median_s"):
            row["speedup"] = base / row["median_s"]
            row["efficiency"] = row["speedup"] / row["nproc"]
    write_atomic(out / "bench.json", json.dumps(table, indent=1) + "\n")
    print(format_table(table, args.model, n))
    print(f"report     {write_bench_report(out, table)}")
    return 0


def _calibrate(torch: Any, counts: set[int]) -> None:
    """This machine's calibration for each process count, measured where there is none yet, so that
    every strategy is predicted on measured rates (each run reads the one for its process count)."""
    from zhilu.calibrate.cli import calibrate
    from zhilu.hardware import calibrated_path, save

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for nproc in sorted(counts):
        path = calibrated_path(device, nproc)
        if not path.exists():
            print(f"bench: calibrating {nproc} x {device} (saved to {path})", flush=True)
            save(calibrate(device, nproc), path)


def _check(common: list[str], run_dir: Path) -> None:
    """Raise the error ``zhilu train --dry-run`` gives for the model and flags, before anything runs."""
    done = subprocess.run([*_train_argv(common, 1, "dp=1", run_dir), "--dry-run"], capture_output=True, text=True)
    if done.returncode == 0:
        return
    last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
    if done.returncode == ZhiluError.exit_code and last.startswith("error: "):
        field, _, message = last.removeprefix("error: ").partition(": ")
        raise ZhiluError(field, message)
    raise RuntimeError(f"zhilu train --dry-run failed (exit code {done.returncode}):\n{done.stderr}")


def _train_argv(common: list[str], nproc: int, plan: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "zhilu", "train", *common, "--nproc", str(nproc), "--plan", plan,
            "--out", str(run_dir)]


def _run_one(run_dir: Path, nproc: int, plan: str, common: list[str], warmup: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    done = subprocess.run(_train_argv(common, nproc, plan, run_dir), capture_output=True, text=True, env=env)
    row: dict[str, Any] = {"plan": plan, "nproc": nproc, "run_dir": str(run_dir)}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        row["failed"] = lines[-1] if lines else f"exit code {done.returncode}"
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    timed = sorted(r["step_time_s"] for r in records if r["step"] > warmup)
    row.update(
        plan=_plan_of(summary) or plan,
        median_s=statistics.median(timed),
        p10_s=timed[int(0.1 * (len(timed) - 1))],
        p90_s=timed[int(round(0.9 * (len(timed) - 1)))],
        predicted_s=summary.get("predicted_step_time_s"),
        peak_mib=max((m["peak"] for m in summary.get("memory_mib_per_rank") or []), default=None),
        final_loss=summary.get("final_loss"),
        breakdown={t: statistics.median(r["breakdown"].get(t, 0.0) for r in records if r["step"] > warmup)
                   for t in records[-1].get("breakdown", {})},
        predicted=summary.get("predicted_breakdown") or {},
        memory_mib_per_rank=summary.get("memory_mib_per_rank") or [],
        losses=[[r["step"], r["loss"]] for r in records],
    )
    if row["predicted_s"]:
        row["error"] = row["predicted_s"] / row["median_s"] - 1
    return row


def format_table(table: list[dict[str, Any]], model: str, n: int) -> str:
    lines = [f"{model} on {n} devices, the median step after warm-up (p10-p90), predicted beside it",
             f"{'strategy':<16} {'plan':<24} {'ms/step':>8} {'p10-p90':>13} {'predicted':>9} {'error':>7} "
             f"{'speed-up':>8} {'effic.':>6} {'peak MiB':>9} {'loss':>7}"]
    for r in table:
        if "failed" in r:
            lines.append(f"{r['strategy']:<16} {r['plan']:<24} failed: {r['failed']}")
            continue
        pred = f"{r['predicted_s'] * 1e3:9.1f}" if r.get("predicted_s") else f"{'-':>9}"
        err = f"{r['error']:+7.0%}" if "error" in r else f"{'-':>7}"
        speed = f"{r['speedup']:7.2f}x {r['efficiency']:6.0%}" if "speedup" in r else f"{'-':>8} {'-':>6}"
        peak = f"{r['peak_mib']:9,.0f}" if r.get("peak_mib") else f"{'-':>9}"
        lines.append(f"{r['strategy']:<16} {r['plan']:<24} {r['median_s'] * 1e3:8.1f} "
                     f"{r['p10_s'] * 1e3:6.1f}-{r['p90_s'] * 1e3:<6.1f} {pred} {err} {speed} {peak} "
                     f"{r['final_loss']:7.4f}")
    return "\n".join(lines)


def _plan_of(summary: dict[str, Any]) -> str:
    from zhilu.plan import Plan

    try:
        return Plan(**summary["plan"]).describe()
    except (KeyError, TypeError):
        return ""


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")
