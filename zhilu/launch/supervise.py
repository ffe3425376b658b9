"""zhilu's launcher for local processes: attempts, restarts, hangs, signals, and the summary
of a run that could not summarise itself.

Each attempt is one torch elastic launch (:func:`zhilu.launch.local.run_local`). When a
worker dies (any rank, any moment, a checkpoint write included) or the hang watchdog ends an
attempt (:mod:`zhilu.training.watchdog`), the launcher records why and at which step, and
starts the next attempt, which continues from the newest good checkpoint, up to
``launch.max_restarts`` times. SIGTERM, SIGINT, SIGHUP or SIGQUIT stop every worker (torch
elastic's handlers) and leave the run resumable; SIGUSR1 (Slurm's ``--signal=USR1@SECONDS``
before a pre-emption) is passed to the workers, which checkpoint at the next step and stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from zhilu.config import JobConfig
from zhilu.errors import ZhiluError
from zhilu.launch.local import Interrupted, TrainingFailed, WorkerFailed, run_local
from zhilu.plan import Plan
from zhilu.spec import ModelSpec


def supervise(cfg: JobConfig, plan: Plan, spec: ModelSpec) -> dict[str, Any] | None:
    """Run the prepared job in ``cfg.launch.nproc`` local processes until it ends; rank 0's summary."""
    from zhilu.training import trainer, watchdog
    from zhilu.training.summary import note_resumed, write_ended

    run_dir = Path(cfg.run.out)
    sent = None if spec.source is not None else spec  # a --model spec is resolved again in each process
    history: list[dict[str, Any]] = []
    restarts = cfg.launch.max_restarts
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: _pass_on(signum, run_dir))
    try:
        for attempt in range(restarts + 1):
            watchdog.clear(run_dir)
            try:
                results = run_local(trainer.run, (cfg, plan, sent, attempt, history, True), cfg.launch.nproc,
                                    cfg.launch.port)
            except WorkerFailed as e:
                cause, reached = _cause(e, run_dir)
                note_resumed(history, watchdog.resumed_from(run_dir))  # the workers' copy is gone
                if e.traceback:
                    print(f"zhilu: rank {e.rank} raised:\n{e.traceback.rstrip()}", file=sys.stderr, flush=True)
                remove_partial_saves(run_dir)
                if attempt == restarts:
                    write_ended(run_dir, "failed", cause, history, reached)
                    raise TrainingFailed(f"{cause}{_at(reached)}; no restarts left (launch.max_restarts={restarts}); "
                                         f"continue with --resume") from None
                history.append({"attempt": attempt + 1, "cause": cause, "reached_step": reached})
                print(f"zhilu: {cause}{_at(reached)}; restarting from the newest good checkpoint "
                      f"(restart {attempt + 1} of {restarts})", flush=True)
                continue
            except Interrupted as e:
                note_resumed(history, watchdog.resumed_from(run_dir))
                remove_partial_saves(run_dir)
                reached = last_step(run_dir)
                write_ended(run_dir, "interrupted", f"stopped by {e}", history, reached)
                raise
            result = results.get(0)
            if isinstance(result, dict) and "error" in result and "ended" not in result:
                raise ZhiluError(*result["error"])  # the workers refused the job (bad input)
            return result
    finally:
        signal.signal(signal.SIGUSR1, previous)
        watchdog.clear(run_dir)
    return None


def remove_partial_saves(run_dir: Path) -> None:
    """Delete the temporary folders of saves a crash or a signal interrupted (no worker is left)."""
    root = run_dir / "checkpoints"
    for folder in [*root.glob(".step-*.tmp"), *root.glob(".step-*.old")]:
        shutil.rmtree(folder, ignore_errors=True)


def _cause(e: WorkerFailed, run_dir: Path) -> tuple[str, int | None]:
    """Why the attempt ended, in words, and the last step a rank completed."""
    from zhilu.training import watchdog

    reached = last_step(run_dir)
    hang = watchdog.read_hang(run_dir)
    if hang is not None:
        return (f"rank {hang.get('rank')} hung ({hang.get('reason')}) at step {hang.get('step')} "
                f"({hang.get('phase')}) for {hang.get('stalled_s', 0):.0f} s"), reached
    return str(e), reached


def last_step(run_dir: Path) -> int | None:
    """The last step the job completed, as far as its files tell: the heartbeats (each rank's,
    every second) and metrics.jsonl (each logged step)."""
    import json

    from zhilu.training import watchdog

    steps = list(watchdog.last_steps(run_dir).values())
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        steps += [json.loads(lines[-1])["step"]] if lines else []
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return max(steps, default=None)


def _at(step: int | None) -> str:
    return f" after step {step}" if step is not None else ""


def _pass_on(signum: int, run_dir: Path) -> None:
    """A signal to the launcher, passed on to the workers of the running attempt."""
    from zhilu.training import watchdog

    for pid in watchdog.pids(run_dir).values():
        try:
            os.kill(pid, signum)
        except OSError:
            pass
