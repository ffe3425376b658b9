"""The hang watchdog on real processes: a stopped rank and a rank stuck behind are named and
killed, a rank that makes progress is never flagged; bound() and close() on their own.

Run: ``.venv/bin/pytest tests/test_watchdog.py``
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zhilu.training.watchdog import HUNG_EXIT_CODE, Watchdog, clear, last_steps, read_hang

# One rank of a fake job. After a barrier (every rank's heartbeat file exists), it runs steps
# 1 .. until-1 (forward, backward, optimizer, `sleep` s a step), enters phase `at` of step
# `until` and then: "stop" (SIGSTOP itself, once its heartbeat shows that step), "block"
# (sleep forever, as in a collective that never completes) or "exit" (close, exit 0).
RANK = r"""
import json, os, signal, sys, time
from pathlib import Path
from zhilu.training.watchdog import Watchdog

a = json.loads(sys.argv[1])
run = Path(a["run"])
dog = Watchdog(run, a["rank"], a["world"], timeout_s=a["timeout"], startup_timeout_s=a["startup"],
               beat_s=a["beat"])
while not all((run / "heartbeat" / f"rank-{r}.json").exists() for r in a["barrier"]):
    time.sleep(0.01)
dog.step_done(0.1)
for step in range(1, a["until"]):
    for name in ("forward", "backward", "optimizer"):
        dog.phase(step, name)
        time.sleep(a["sleep"] / 3)
    dog.step_done(a["sleep"])
dog.phase(a["until"], a["at"])
if a["then"] == "exit":
    dog.close()
    sys.exit(0)
if a["then"] == "stop":
    beat = run / "heartbeat" / f"rank-{a['rank']}.json"
    while json.loads(beat.read_text())["step"] != a["until"]:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGSTOP)
while True:
    time.sleep(1)
"""


def start(run: Path, rank: int, world: int = 2, *, until: int, at: str = "forward", then: str = "block",
          timeout: float = 2.0, startup: float = 2.0, beat: float = 0.2, sleep: float = 0.1,
          barrier: tuple[int, ...] = (0, 1)) -> subprocess.Popen[str]:
    args = {"run": str(run), "rank": rank, "world": world, "until": until, "at": at, "then": then,
            "timeout": timeout, "startup": startup, "beat": beat, "sleep": sleep, "barrier": list(barrier)}
    return subprocess.Popen([sys.executable, "-c", RANK, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 45) -> tuple[int, str]:
    """(exit status, stderr) of a rank; killed if it outlives a generous timeout."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"rank did not exit within {timeout} s; stderr: {stderr[-2000:]}")
    return proc.returncode, stderr


def hang_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("zhilu: hang:")]


def wait_stopped(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid:
            assert os.WIFSTOPPED(status), f"rank exited instead of stopping: status {status}"
            return
        time.sleep(0.02)
    pytest.fail("rank did not stop itself")


def test_stopped_rank_is_named_and_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Rank 1 stops (kill -STOP) in step 5's forward before rank 0 starts, so rank 0, blocked
    # in step 5's backward "collective", sees a rank whose heartbeat goes stale.
    rank1 = start(run, 1, until=5, then="stop", barrier=(1,), timeout=60, startup=60)
    rank0 = None
    try:
        wait_stopped(rank1)
        rank0 = start(run, 0, until=5, at="backward", then="block")
        status, stderr = finish(rank0)
        assert status == HUNG_EXIT_CODE, stderr
        assert rank1.wait(timeout=10) == -signal.SIGKILL  # rank 0 killed the stopped rank
    finally:
        for proc in (rank0, rank1):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    hang = read_hang(run)
    assert hang is not None
    assert (hang["rank"], hang["step"], hang["phase"]) == (1, 5, "forward")
    assert (hang["reason"], hang["seen_by"]) == ("stopped responding", 0)
    assert hang["stalled_s"] > 0
    lines = hang_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("zhilu: hang: rank 1 stopped responding at step 5 (forward) for ")
    assert lines[0].endswith("; seen by rank 0; bound 2 s")
    assert last_steps(run) == {0: 4, 1: 4}  # neither rank closed: both files are left; both were in step 5
    clear(run)
    assert not (run / "heartbeat").exists() and read_hang(run) is None and last_steps(run) == {}


def test_rank_stuck_behind_is_named_furthest_behind(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A deadlock: both ranks alive and beating, rank 0 waits in step 5, rank 1 never left step 3.
    ranks = [start(run, 0, until=5, at="backward", timeout=3, startup=30, sleep=0.03),
             start(run, 1, until=3, at="forward", timeout=3, startup=30, sleep=0.1)]
    try:
        (status0, stderr0), (status1, stderr1) = finish(ranks[0]), finish(ranks[1])
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    hang = read_hang(run)
    assert hang is not None, stderr0 + stderr1
    assert (hang["rank"], hang["step"], hang["phase"]) == (1, 3, "forward")
    assert hang["reason"] == "furthest behind"
    # Whoever saw it first ended itself; rank 1 either ended itself or was killed by rank 0.
    assert status0 == HUNG_EXIT_CODE, stderr0
    assert status1 in (HUNG_EXIT_CODE, -signal.SIGKILL), stderr1
    assert len(hang_lines(stderr0)) == 1, stderr0
    assert len(hang_lines(stderr1)) == (1 if status1 == HUNG_EXIT_CODE else 0), stderr1


def test_progressing_ranks_are_never_flagged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # 60 steps of 0.1 s each: the run lasts three times the 2 s bound, but no phase does.
    ranks = [start(run, r, until=61, then="exit", timeout=2, startup=30, beat=0.1) for r in (0, 1)]
    results = [finish(proc) for proc in ranks]
    assert [status for status, _ in results] == [0, 0], results
    assert not any(hang_lines(stderr) for _, stderr in results)
    assert read_hang(run) is None
    assert last_steps(run) == {}  # close() removed both heartbeat files


@pytest.fixture
def quiet_dog(tmp_path: Path):
    """A watchdog whose thread beats once at start, then not for 60 s: bound() on its own."""
    dogs: list[Watchdog] = []

    def make(**kw: float) -> Watchdog:
        dogs.append(Watchdog(tmp_path / "run", 0, 1, beat_s=60.0, **kw))
        return dogs[-1]

    yield make
    for dog in dogs:
        dog.close()


def test_derived_bound_is_five_medians_with_a_60_s_floor(quiet_dog) -> None:
    dog = quiet_dog(timeout_s=0.0, startup_timeout_s=600.0)
    assert dog.bound() == 600  # "start", no step yet
    dog.phase(1, "forward")
    assert dog.bound() == 600  # before the first step_done(), a startup bound in any phase
    dog.step_done(2.0)
    assert dog.bound() == 60  # 5 x 2 s is under the floor
    dog.step_done(30.0)
    dog.step_done(40.0)
    assert dog.bound() == 150  # 5 x median(2, 30, 40)
    dog.phase(1, "eval")
    assert dog.bound() == 150
    for name in ("save", "load", "start"):
        dog.phase(2, name)
        assert dog.bound() == 600, name  # slow phases keep the startup bound
    for _ in range(6):
        dog.step_done(1000.0)
    assert dog.bound() == 5000  # the startup bound is a floor, not a cap
    dog.phase(2, "forward")
    assert dog.bound() == 5000


def test_fixed_timeout_overrides_the_step_times(quiet_dog) -> None:
    dog = quiet_dog(timeout_s=7.0, startup_timeout_s=600.0)
    assert dog.bound() == 600
    dog.step_done(100.0)
    dog.phase(1, "backward")
    assert dog.bound() == 7
    dog.phase(1, "save")
    assert dog.bound() == 600
    short = quiet_dog(timeout_s=7.0, startup_timeout_s=3.0)
    assert short.bound() == 7  # startup phases: max(startup_timeout_s, timeout_s)


def test_close_removes_the_heartbeat_and_stops_the_thread(tmp_path: Path) -> None:
    run = tmp_path / "run"
    dog = Watchdog(run, 3, 4, timeout_s=100, beat_s=0.05)
    dog.phase(7, "optimizer")
    path = run / "heartbeat" / "rank-3.json"
    deadline = time.monotonic() + 20
    while last_steps(run).get(3) != 6 and time.monotonic() < deadline:  # in step 7: 6 completed
        time.sleep(0.01)
    beat = json.loads(path.read_text())
    assert beat["rank"] == 3 and beat["pid"] == os.getpid() and beat["phase"] == "optimizer"
    assert beat["beat"] >= beat["phase_since"]
    dog.close()
    assert not path.exists()
    assert "zhilu-watchdog-3" not in [t.name for t in threading.enumerate()]
    time.sleep(0.3)  # several beats' time: nothing writes the file again
    assert not path.exists() and list((run / "heartbeat").iterdir()) == []
    dog.close()  # twice is harmless
