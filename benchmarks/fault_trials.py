"""Fault trials: kill a random rank at a random moment, and check the run still ends bitwise
equal to the uninterrupted one.

    .venv/bin/python benchmarks/fault_trials.py 50            # 50 trials, seed 0
    .venv/bin/python benchmarks/fault_trials.py 5 --seed 3    # a quick look

Each trial draws a world size (2 or 4 local processes, data parallel), a victim rank and a
moment, one of:

* ``step``: the victim SIGKILLs itself as a random step begins;
* ``save``: ... at a random file write of a random save (synchronous checkpoints);
* ``async``: ... the same with ``checkpoint.async = true`` (the write is in the background);
* ``wall``: this script SIGKILLs the victim's process from outside after a random delay
  (any moment at all: start-up, mid-step, mid-collective, mid-write);
* ``all``: this script SIGKILLs the launcher and every rank at once after a random delay,
  then resumes the run by hand with ``--resume``.

The delays are drawn over the uninterrupted run's own duration (10% to 100% of it); a kill
that comes after the run has ended is counted as missed, not as passed.

Runs use ``--max-restarts 2`` and a checkpoint every 2 steps. A trial passes when the run
finishes with ``final_params_sha256`` equal to the uninterrupted run's (same world size) and
recomputes at most the checkpoint interval per restart: 2 steps, or with asynchronous saves
4, because a checkpoint counts once its background write is complete, and training goes on
for up to one interval meanwhile (the next save waits for it). Runs until N trials were not
missed; prints one line per trial and the count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["--model.n_layers", "2", "--model.hidden", "64", "--model.n_heads", "4", "--model.ffn_hidden", "128",
         "--seq-len", "32", "--train.log_every", "1", "--train.eval_batches", "2", "--train.sample_tokens", "0"]
STEPS, EVERY = 12, 2
JOB = ["--steps", str(STEPS), "--global-batch", "8", "--checkpoint-every", str(EVERY), "--max-restarts", "2"]
KINDS = ("step", "save", "async", "wall", "all")


def command(out: Path, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "zhilu", "train", *MICRO, *JOB, "--nproc", str(nproc), "--out", str(out), *extra]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"} | (env or {})
    return subprocess.run(args, capture_output=True, text=True, env=full, timeout=timeout, cwd=ROOT)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def kill_from_outside(args: list[str], out: Path, delay: float, victim: int | None) -> bool:
    """Start the run; after ``delay`` s SIGKILL rank ``victim`` (its pid from the heartbeats),
    or, with None, the launcher and every rank at once. Whether the kill came before the end."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
                            start_new_session=True)
    time.sleep(delay)
    hit = False
    try:
        if victim is None:
            hit = proc.poll() is None
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            beat = out / "heartbeat" / f"rank-{victim}.json"
            while proc.poll() is None and not beat.exists():
                time.sleep(0.05)
            if proc.poll() is None:
                os.kill(json.loads(beat.read_text())["pid"], signal.SIGKILL)
                hit = True
        proc.wait(timeout=600)
        return hit
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def trial(rng: random.Random, root: Path, reference: dict[int, str], wall: dict[int, float]) -> tuple[bool | None, str]:
    """(passed, or None when the kill came after the run had ended; one line)."""
    nproc = rng.choice((2, 4))
    victim, kind = rng.randrange(nproc), rng.choice(KINDS)
    out = root / f"trial-{rng.random():.6f}"
    args = command(out, nproc)
    env = {}
    if kind == "step":
        at = rng.randint(1, STEPS)
        env["ZHILU_FAULTS"] = f"kill:rank={victim}:step={at}"
    elif kind in ("save", "async"):
        at = rng.randrange(EVERY, STEPS + 1, EVERY)
        write = rng.randint(1, 4 if victim == 0 else 1)  # rank 0 writes data, .metadata, manifest, latest
        env["ZHILU_FAULTS"] = f"kill:rank={victim}:save={at}:write={write}"
        at = f"{at} write {write}"
        if kind == "async":
            args += ["--checkpoint.async", "true"]
    else:
        delay = rng.uniform(0.1, 1.0) * wall[nproc]
        at = f"{delay:.1f} s"
        if not kill_from_outside(args, out, delay, None if kind == "all" else victim):
            return None, f"{nproc} ranks, {kind} kill at {at}: missed (the run had ended)"
    if kind in ("step", "save", "async"):
        result = run(args, env)
    else:
        # killed all at once (or the launcher gave up): resume by hand, unless it had finished
        # (before the first checkpoint that starts the run again)
        ended = (out / "summary.json").exists() and summary(out)["ended"]
        result = run(args + ["--resume"]) if ended != "finished" else None
    what = f"{nproc} ranks, {kind} kill of rank {victim if kind != 'all' else 'all'} at {at}"
    if result is not None and result.returncode != 0:
        return False, f"{what}: exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"
    s = summary(out)
    recomputed = [h.get("steps_recomputed") or 0 for h in s["restart_causes"]]
    bound = 2 * EVERY if kind == "async" else EVERY
    equal, within = s["final_params_sha256"] == reference[nproc], all(r <= bound for r in recomputed)
    return equal and within, (f"{what}: {'bitwise equal' if equal else 'DIFFERENT'}, {s['restarts']} restarts, "
                              f"recomputed {recomputed}{'' if within else f', MORE than {bound}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trials", type=int, help="number of trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="zhilu-fault-trials-") as folder:
        root = Path(folder)
        reference, wall = {}, {}
        for n in (2, 4):
            start = time.monotonic()
            result = run(command(root / f"reference-{n}", n))
            wall[n] = time.monotonic() - start
            assert result.returncode == 0, result.stderr[-3000:]
            reference[n] = summary(root / f"reference-{n}")["final_params_sha256"]
            print(f"uninterrupted run, {n} ranks: {wall[n]:.1f} s", flush=True)
        passed = missed = done = 0
        while done < args.trials:
            ok, line = trial(rng, root, reference, wall)
            passed, missed, done = passed + bool(ok), missed + (ok is None), done + (ok is not None)
            print(f"trial {done + missed:>3}: {line}", flush=True)
        print(f"{passed}/{done} trials ended bitwise equal to the uninterrupted run, recomputing at most the "
              f"checkpoint interval{f' ({missed} more kills came after the run had ended)' if missed else ''}")


if __name__ == "__main__":
    main()
