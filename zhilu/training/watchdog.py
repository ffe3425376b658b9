"""Hang watchdog: notice a stuck job, name the rank that stuck it, end the attempt.

Each rank runs one :class:`Watchdog`. The main thread only records where it is
(:meth:`Watchdog.phase`, :meth:`Watchdog.step_done`: attribute writes, no I/O); a daemon
thread wakes every ``beat_s`` and writes ``RUN/heartbeat/rank-R.json`` atomically::

    {"rank", "pid", "host", "step", "phase", "phase_since", "beat", "resumed_from"}

``phase_since`` is when the current phase began and ``beat`` is now (both ``time.time()``);
``resumed_from`` is the step of the checkpoint this attempt continued from (null before it
has loaded one), so the launcher can count recomputed steps of an attempt that died.
When this rank has been in one phase longer than :meth:`Watchdog.bound`, the thread reads
every rank's heartbeat and names the culprit:

* a rank whose ``beat`` is older than ``max(10 x beat_s, 10 s)`` *stopped responding*
  (``kill -STOP``, a stuck interpreter, a dead process): its own thread cannot beat;
* else the rank *furthest behind*, the lowest ``(step, phase)`` (ties: this rank, then the
  lowest rank): in a deadlock every rank waits for the one that never reached the collective;
* else (no heartbeat readable) this rank itself.

A rank that missed a few beats but is not stale yet may be stopped or merely slow, so the
verdict waits for it (at most the stale window) rather than call it "furthest behind".

The first rank to decide creates ``RUN/heartbeat/hang.json`` (``O_EXCL``: first writer wins)
with ``{"rank", "step", "phase", "stalled_s", "seen_by", "reason"}``, prints one line::

    zhilu: hang: rank 1 stopped responding at step 12 (forward) for 63 s; seen by rank 0; bound 60 s

SIGKILLs the culprit when it runs on this host and is not this process (a stopped process
cannot stop itself), and ends this process with :data:`HUNG_EXIT_CODE`. The supervisor reads
:func:`read_hang`, calls :func:`clear` and restarts the job.

The watchdog must never be the cause of a failure: I/O errors in the thread are ignored
(the next beat retries) and the thread is a daemon. Staleness compares ``time.time()`` across
hosts, so their clocks must agree to within a few seconds (NTP does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

HUNG_EXIT_CODE = 124  # the exit status `timeout` uses
HANG_FILE = "hang.json"
# Order of the phases within one step, to find the rank furthest behind; unknown names sort last.
PHASES = ("start", "load", "forward", "backward", "optimizer", "end", "eval", "save")
# Phases that may legitimately take long: startups compile, saves and loads move big files.
SLOW_PHASES = frozenset({"start", "load", "save"})
MIN_BOUND_S = 60.0  # floor of the derived bound: scheduler noise, a slow file system
STEP_FACTOR = 5.0  # derived bound = 5 medians: room for an eval or a slow step
STEP_WINDOW = 201  # the median is over the most recent step times, so it follows the run


def heartbeat_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "heartbeat"


def read_hang(run_dir: Path) -> dict | None:
    """The job's ``hang.json``, or None if there is none or it cannot be read."""
    try:
        data = json.loads((heartbeat_dir(run_dir) / HANG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clear(run_dir: Path) -> None:
    """Remove the whole heartbeat folder (the supervisor calls it between attempts)."""
    shutil.rmtree(heartbeat_dir(run_dir), ignore_errors=True)


def _heartbeats(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every readable ``rank-R.json``, by rank; unreadable or half-written ones are skipped."""
    found: dict[int, dict[str, Any]] = {}
    try:
        paths = sorted(heartbeat_dir(run_dir).glob("rank-*.json"))
    except OSError:
        return found
    for path in paths:
        try:
            beat = json.loads(path.read_text())
            found[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def last_steps(run_dir: Path) -> dict[int, int]:
    """Each rank's last completed step, from the heartbeat files (for counting recomputed steps):
    in forward, backward or optimizer, the step reported is still being computed."""
    return {rank: int(beat["step"]) - (beat.get("phase") in _IN_STEP)
            for rank, beat in _heartbeats(run_dir).items() if "step" in beat}


_IN_STEP = ("forward", "backward", "optimizer")


def resumed_from(run_dir: Path) -> int | None:
    """The step of the checkpoint the ranks of the current attempt continued from, if known."""
    steps = [beat["resumed_from"] for beat in _heartbeats(run_dir).values() if beat.get("resumed_from") is not None]
    return min(steps, default=None)


def pids(run_dir: Path) -> dict[int, int]:
    """Each rank's process id, from the heartbeat files."""
    return {rank: int(beat["pid"]) for rank, beat in _heartbeats(run_dir).items() if "pid" in beat}


def _position(beat: dict[str, Any]) -> tuple[int, int]:
    phase = beat.get("phase")
    return int(beat.get("step", -1)), PHASES.index(phase) if phase in PHASES else len(PHASES)


class Watchdog:
    """One rank's hang watchdog; see the module docstring. Starts its thread at once."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float = 0.0,
                 startup_timeout_s: float = 600.0, beat_s: float = 1.0) -> None:
        self.dir = heartbeat_dir(run_dir)
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.startup_timeout_s, self.beat_s = timeout_s, startup_timeout_s, beat_s
        self.stale_s = max(10 * beat_s, 10.0)  # no beat for this long: the rank stopped responding
        self.missed_s = max(3 * beat_s, 1.0)  # no beat for this long: maybe stopped, wait and see
        self.pid, self.host = os.getpid(), socket.gethostname()
        self.path = self.dir / f"rank-{rank}.json"
        self._tmp = self.dir / f".rank-{rank}.json.tmp"
        self._state: tuple[int, str, float] = (0, "start", time.time())  # replaced whole: atomic
        self._resumed_from: int | None = None
        self._write_lock = threading.Lock()  # resumed() writes from the main thread
        self._steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self._steps_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"zhilu-watchdog-{rank}", daemon=True)
        self._thread.start()

    # -- main thread -------------------------------------------------------------------------
    def phase(self, step: int, name: str) -> None:
        """This rank is now at step ``step`` doing ``name`` (cheap: one attribute write)."""
        self._state = (step, name, time.time())

    def step_done(self, seconds: float) -> None:
        """The measured duration of one optimizer step."""
        with self._steps_lock:
            self._steps.append(float(seconds))

    def bound(self) -> float:
        """The hang bound in seconds for the current phase.

        ``timeout_s`` if set, else ``max(5 x median step time, 60 s)``: five medians leave room
        for an eval or a slow step, the floor absorbs scheduler noise. In "start", "load" and
        "save", and before the first step_done(), at least ``startup_timeout_s``.
        """
        with self._steps_lock:
            steps = list(self._steps)
        if self.timeout_s > 0:
            normal = self.timeout_s
        else:
            normal = max(STEP_FACTOR * statistics.median(steps), MIN_BOUND_S) if steps else MIN_BOUND_S
        if not steps or self._state[1] in SLOW_PHASES:
            return max(self.startup_timeout_s, normal)
        return normal

    def resumed(self, step: int) -> None:
        """This attempt continues from the checkpoint of ``step`` (recorded at once)."""
        self._resumed_from = step
        self._write(self._record(time.time()))

    def close(self) -> None:
        """Stop the thread and remove this rank's heartbeat file."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(2 * self.beat_s, 5.0))
        for path in (self.path, self._tmp):
            try:
                path.unlink()
            except OSError:
                pass

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- watchdog thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat()
            except Exception:  # never the cause of a failure: try again next beat
                pass
            self._stop.wait(self.beat_s)

    def _record(self, now: float) -> dict[str, Any]:
        step, name, since = self._state
        return {"rank": self.rank, "pid": self.pid, "host": self.host, "step": step, "phase": name,
                "phase_since": since, "beat": now, "resumed_from": self._resumed_from}

    def _write(self, mine: dict[str, Any]) -> None:
        with self._write_lock:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._tmp.write_text(json.dumps(mine))
                if self._stop.is_set():  # close() ran meanwhile: leave no file behind
                    self._tmp.unlink()
                    return
                os.replace(self._tmp, self.path)
            except OSError:
                pass

    def _beat(self) -> None:
        now = time.time()
        mine = self._record(now)
        self._write(mine)
        if self._stop.is_set():
            return
        bound = self.bound()
        if now - mine["phase_since"] > bound:
            verdict = self._culprit(mine, now)
            if verdict is not None:
                self._fire(*verdict, now, bound)

    def _culprit(self, mine: dict[str, Any], now: float) -> tuple[dict[str, Any], str] | None:
        """(the culprit's heartbeat, the reason), or None to wait for a rank that missed beats."""
        beats = {**_heartbeats(self.dir.parent), self.rank: mine}
        others = [b for r, b in sorted(beats.items()) if r != self.rank]
        stale = [b for b in others if now - float(b.get("beat", 0)) > self.stale_s]
        if stale:
            return min(stale, key=lambda b: float(b.get("beat", 0))), "stopped responding"
        if any(now - float(b.get("beat", 0)) > self.missed_s for b in others):
            return None  # stopped or merely slow: it beats again or goes stale within stale_s
        ranked = sorted(beats.values(), key=lambda b: (_position(b), b["rank"] != self.rank, b["rank"]))
        return ranked[0], "furthest behind"

    def _fire(self, culprit: dict[str, Any], reason: str, now: float, bound: float) -> None:
        rank, step, phase = culprit.get("rank"), culprit.get("step"), culprit.get("phase")
        stalled = max(0.0, now - float(culprit.get("phase_since", now)))
        record = {"rank": rank, "step": step, "phase": phase, "stalled_s": round(stalled, 3),
                  "seen_by": self.rank, "reason": reason}
        try:
            fd = os.open(self.dir / HANG_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, json.dumps(record).encode())
            finally:
                os.close(fd)
        except OSError:  # another rank decided first, or the folder is unwritable: exit anyway
            pass
        try:
            print(f"zhilu: hang: rank {rank} {reason} at step {step} ({phase}) for {stalled:.0f} s; "
                  f"seen by rank {self.rank}; bound {bound:.0f} s", file=sys.stderr, flush=True)
        except Exception:
            pass
        pid = culprit.get("pid")
        if culprit.get("host") == self.host and isinstance(pid, int) and pid != self.pid and pid > 0:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(HUNG_EXIT_CODE)
