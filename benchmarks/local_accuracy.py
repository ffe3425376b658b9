"""The performance model against this machine: every valid plan, predicted and measured.

    python benchmarks/local_accuracy.py [--nproc 2 4] [--steps 20] [--confirm 3]

For each process count: ``zhilu calibrate`` measures the machine, then every plan the
search considers for gpt-tiny (16 x 256 tokens per step) that zhilu can run is trained for
``--steps`` steps with ``zhilu train``, which writes the predicted and the measured step time
(median over the steps after the first) into ``summary.json``, and the prediction corrected
by its first 10 steps (zhilu/monitor/correction.py) with its error on the steps after them.
Prints per plan the prediction, the measurement and the error, and the corrected prediction and
its error; the median absolute errors (targets: at most 15% a priori, 5% corrected);
and whether the plan the search picks is within 10% of the fastest measured one. That last
comparison is made again side by side (the two plans alternate ``--confirm`` times), because
the fastest of many noisy measurements is biased low.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from zhilu.hardware import cluster
from zhilu.models.presets import preset
from zhilu.perf import job

MODEL, SEQ_LEN, BATCH = "gpt-tiny", 256, 16


def train(spec: str, nproc: int, hardware: Path, out: Path, steps: int) -> dict:
    """One short run of ``spec``; its summary."""
    cmd = [sys.executable, "-m", "zhilu", "train", "--model", MODEL, "--nproc", str(nproc), "--plan", spec,
           "--steps", str(steps), "--global-batch", str(BATCH), "--seq-len", str(SEQ_LEN), "--out", str(out),
           "--parallel.hardware", str(hardware), "--train.log_every", "1", "--train.eval_every", "0",
           "--train.eval_batches", "1", "--train.sample_tokens", "0", "--train.warmup_steps", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=20, help="steps per run (the correction takes the first 10)")
    parser.add_argument("--confirm", type=int, default=3, help="side-by-side repeats of the picked and the fastest")
    parser.add_argument("--max-plans", type=int, default=0, help="only the first N plans of each search (0: all)")
    args = parser.parse_args()
    model = preset(MODEL)
    errors: list[float] = []
    corrected: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.nproc:
            hw_file = root / f"hardware-{n}.toml"
            subprocess.run([sys.executable, "-m", "zhilu", "calibrate", "--nproc", str(n), "--out", str(hw_file)],
                           check=True, capture_output=True)
            plans = job.candidates(model, SEQ_LEN, BATCH, n, cluster(str(hw_file)), "cpu")
            if args.max_plans:
                plans = plans[:args.max_plans]
            print(f"\n{n} processes: {len(plans)} plans, search order (predicted fastest first)")
            print(f"{'plan':<58} {'predicted':>10} {'measured':>10} {'error':>7} {'corrected':>10} {'error':>7}")
            measured: dict[str, float] = {}
            here: list[float] = []
            for i, (plan, _) in enumerate(plans):
                spec = plan.spec()
                s = train(spec, n, hw_file, root / f"run-{n}-{i}", args.steps)
                measured[spec] = s["measured_step_time_s"]
                here.append(abs(s["prediction_error"]) * 100)
                line = (f"{spec:<58} {s['predicted_step_time_s'] * 1e3:>8.0f}ms {measured[spec] * 1e3:>8.0f}ms "
                        f"{s['prediction_error'] * 100:>+6.1f}%")
                if s.get("corrected_error") is not None:
                    corrected.append(abs(s["corrected_error"]) * 100)
                    line += f" {s['corrected_step_time_s'] * 1e3:>8.0f}ms {s['corrected_error'] * 100:>+6.1f}%"
                print(line, flush=True)
            errors += here
            picked, fastest = plans[0][0].spec(), min(measured, key=measured.get)
            print(f"median |error| with {n} processes: {statistics.median(here):.1f}% over {len(here)} plans")
            print(f"picked {picked}: {measured[picked] * 1e3:.0f} ms; fastest measured {fastest}: "
                  f"{measured[fastest] * 1e3:.0f} ms")
            if picked == fastest:
                print("the picked plan is the fastest measured: picked / fastest = 1.000")
            elif args.confirm:
                times: dict[str, list[float]] = {picked: [], fastest: []}
                for r in range(args.confirm):
                    for spec in (picked, fastest):
                        s = train(spec, n, hw_file, root / f"confirm-{n}-{r}-{len(times[spec])}-{spec}", args.steps)
                        times[spec].append(s["measured_step_time_s"])
                a, b = (statistics.median(times[k]) for k in (picked, fastest))
                print(f"side by side, {args.confirm} runs each: picked {a * 1e3:.0f} ms, fastest {b * 1e3:.0f} ms: "
                      f"picked / fastest = {a / b:.3f} (target: at most 1.10)")
            else:
                print(f"picked / fastest = {measured[picked] / measured[fastest]:.3f} (target: at most 1.10)")
    print(f"\nmedian |error| over all {len(errors)} plans: {statistics.median(errors):.1f}% (target: at most 15%)")
    if corrected:
        print(f"median |error| of the prediction corrected by the first 10 steps, on the steps after them, over "
              f"{len(corrected)} plans: {statistics.median(corrected):.1f}% (target: at most 5%)")


if __name__ == "__main__":
    main()
