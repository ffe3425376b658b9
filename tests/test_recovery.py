"""Recovery, specified by faults injected into real runs (real processes, real SIGKILL):
whatever happens, the run ends with parameters bitwise equal to an uninterrupted run's
(``final_params_sha256``), recomputing at most the steps since the last checkpoint.

Faults come from ``ZHILU_FAULTS`` (zhilu/training/faults.py): a rank killing itself at a step
or at the k-th file write of a save, stopping itself (a hang), a NaN loss on one batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MICRO, train, zhilu

EVERY = 2
JOB = ["--steps", "6", "--global-batch", "8", "--checkpoint-every", str(EVERY)]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def sha(run: Path) -> str:
    return summary(run)["final_params_sha256"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """final_params_sha256 of the uninterrupted run, by process count (data parallel over all)."""
    root = tmp_path_factory.mktemp("reference")
    return {n: sha(train(root / f"n{n}", *JOB, "--nproc", str(n))) for n in (1, 2, 4)}


@pytest.mark.parametrize("nproc,trial", [(2, 0), (4, 1)])
def test_a_rank_killed_at_a_random_step_restarts_and_ends_bitwise_equal(nproc: int, trial: int,
                                                                        reference: dict[int, str],
                                                                        tmp_path: Path) -> None:
    rng = random.Random(trial)
    victim, step = rng.randrange(nproc), rng.randint(2, 6)
    out = train(tmp_path / "run", *JOB, "--nproc", str(nproc), "--max-restarts", "1",
                env={"ZHILU_FAULTS": f"kill:rank={victim}:step={step}"})
    s = summary(out)
    assert s["ended"] == "finished" and s["restarts"] == 1
    assert f"rank {victim} was killed by SIGKILL" in s["restart_causes"][0]["cause"]
    assert s["final_params_sha256"] == reference[nproc]
    assert s["steps_recomputed"] <= EVERY


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rank_killed_while_writing_a_checkpoint(mode: str, reference: dict[int, str], tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB, "--nproc", "2", "--max-restarts", "1", "--checkpoint.async",
                str(mode == "async").lower(), env={"ZHILU_FAULTS": "kill:rank=1:save=4:write=1"})
    s = summary(out)
    assert s["restarts"] == 1 and s["restart_causes"][0]["resumed_from_step"] == 2  # step 4 never completed
    assert s["final_params_sha256"] == reference[2]
    assert not list((out / "checkpoints").glob(".step-*"))


def test_every_rank_killed_at_once_then_resumed_by_hand(reference: dict[int, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "zhilu", "train", *MICRO, *JOB, "--nproc", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"} | {"ZHILU_FAULTS": "stop:rank=0:step=6"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:  # rank 0 stops itself as step 6 begins (after the checkpoint of step 4): then kill everything
        while not _stopped(out / "heartbeat" / "rank-0.json"):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker, at once
        proc.wait()
    train(out, *JOB, "--nproc", "2", "--resume")
    assert summary(out)["final_params_sha256"] == reference[2]


def _stopped(heartbeat: Path) -> bool:
    """Whether the rank of this heartbeat file is stopped (state T in /proc)."""
    try:
        pid = json.loads(heartbeat.read_text())["pid"]
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, ValueError, KeyError):
        return False


@pytest.mark.parametrize("write", [1, 2, 3, 4])  # the data file, .metadata, manifest.json, latest
def test_a_save_killed_at_any_write_never_leaves_a_torn_checkpoint(write: int, reference: dict[int, str],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = zhilu("train", *MICRO, *JOB, "--out", str(out), env={"ZHILU_FAULTS": f"kill:save=4:write={write}"})
    assert killed.returncode == -signal.SIGKILL
    resumed = zhilu("train", *MICRO, *JOB, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sha(out) == reference[1]


@pytest.mark.parametrize("write", [1, 2, 3, 4])
def test_a_save_whose_write_fails_is_never_loaded_torn(write: int, reference: dict[int, str], tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB, "--max-restarts", "1", env={"ZHILU_FAULTS": f"fail:save=4:write={write}"})
    s = summary(out)
    assert s["restarts"] == 1 and f"OSError: ZHILU_FAULTS: write {write} of the save at step 4 failed" in \
        s["restart_causes"][0]["cause"]
    # the data, .metadata and manifest writes leave step 4 incomplete; a failed `latest` write
    # leaves it complete and verified, only not yet named
    assert s["restart_causes"][0]["resumed_from_step"] == (4 if write == 4 else 2)
    assert sha(out) == reference[1]


def _truncate(ckpt: Path) -> None:
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _flip(ckpt: Path) -> None:
    data = next(ckpt.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))


DAMAGE = {  # what is done to step 4, the newest checkpoint; what the line says; which checkpoint is used
    "truncated": (_truncate, "step-00000004 is damaged (__0_0.distcp changed", 2),
    "flipped": (_flip, "step-00000004 is damaged (__0_0.distcp changed", 2),
    "no manifest": (lambda ckpt: (ckpt / "manifest.json").unlink(), "step-00000004 has no manifest.json", 2),
    "removed": (lambda ckpt: shutil.rmtree(ckpt), "latest names step-00000004, which is not a complete", 2),
    "garbage latest": (lambda ckpt: (ckpt.parent / "latest").write_bytes(b"\x00\xff garbage"), "latest holds", 4),
    "latest elsewhere": (lambda ckpt: (ckpt.parent / "latest").write_text("../../elsewhere\n"), "latest holds", 4),
}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-process run killed at step 6: checkpoints of steps 2 and 4."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    assert zhilu("train", *MICRO, *JOB, "--out", str(out), env={"ZHILU_FAULTS": "kill:step=6"}).returncode == -9
    return out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_newest_good_one_used(damage: str, crashed: Path,
                                                                   reference: dict[int, str], tmp_path: Path) -> None:
    out = Path(shutil.copytree(crashed, tmp_path / "run"))
    damage_it, named, used = DAMAGE[damage]
    damage_it(out / "checkpoints" / "step-00000004")
    resumed = zhilu("train", *MICRO, *JOB, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stdout.splitlines() if "; using step-" in line]
    assert len(said) == 1 and named in said[0] and said[0].endswith(f"using step-{used:08d}"), said
    assert f"resumed at step {used}" in resumed.stdout
    assert sha(out) == reference[1]


def test_no_good_checkpoint_is_one_error_line(tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB, "--checkpoint.keep", "1")
    _flip(out / "checkpoints" / "step-00000006")
    result = zhilu("train", *MICRO, *JOB, "--steps", "8", "--out", str(out), "--resume")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no good checkpoint" in errors[0] and "step-00000006 is damaged" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB, "--nproc", "2", env={"ZHILU_FAULTS": "nan:rank=1:batch=2"})
    s = summary(out)
    assert [(b["step"], b["batch"], b["ranks"], b["loss"]) for b in s["bad_steps"]] == [(3, 2, [1], None)]
    without = train(tmp_path / "without", *JOB, "--nproc", "2", "--train.skip_batches", "2")
    assert s["final_params_sha256"] == sha(without)  # skipping equals never having had the batch
    batches = [json.loads(line)["batch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert batches == [0, 1, 3, 4, 5, 6]


def test_abort_stops_at_the_first_bad_step_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = zhilu("train", *MICRO, *JOB, "--out", str(out), "--train.on_bad_step", "abort",
                   env={"ZHILU_FAULTS": "nan:batch=3"})
    assert result.returncode == 1
    assert "aborted at step 4: the loss is not finite (train.on_bad_step=abort)" in result.stderr
    s = summary(out)
    assert s["ended"] == "aborted" and s["last_step"] == 3 and s["final_params_sha256"]
    assert (out / "checkpoints" / "step-00000003" / "manifest.json").exists()


def test_rollback_returns_to_the_checkpoint_and_passes_over_the_batches_since(tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB, "--train.on_bad_step", "rollback", "--train.bad_steps_in_a_row", "2",
                env={"ZHILU_FAULTS": "nan:batch=4;nan:batch=5"})
    batches = [json.loads(line)["batch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert batches == [0, 1, 2, 3, 6, 7]  # back to step 4 after two bad steps; 4 and 5 passed over
    without = train(tmp_path / "without", *JOB, "--train.skip_batches", "4-5")
    assert sha(out) == sha(without)


def test_a_hung_rank_is_named_and_the_job_restarted(reference: dict[int, str], tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB, "--nproc", "2", "--max-restarts", "1", "--launch.hang_timeout", "3",
                env={"ZHILU_FAULTS": "stop:rank=1:step=4"})
    cause = summary(out)["restart_causes"][0]["cause"]
    assert cause.startswith("rank 1 hung (stopped responding)"), cause
    assert sha(out) == reference[2]


def test_out_of_restarts_the_launcher_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    faults = "kill:rank=1:step=3;kill:rank=1:step=6:attempt=1"  # the restart, from step 2, dies at step 6
    result = zhilu("train", *MICRO, *JOB, "--nproc", "2", "--max-restarts", "1", "--out", str(out),
                   env={"ZHILU_FAULTS": faults})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("zhilu train:")]
    assert len(lines) == 1 and "rank 1 was killed by SIGKILL" in lines[0] and "no restarts left" in lines[0]
    s = summary(out)
    assert s["ended"] == "failed" and s["final_params_sha256"] is None and s["last_step"] == 5
    assert s["restarts"] == 1 and s["restart_causes"][0]["resumed_from_step"] == 2
    assert s["steps_recomputed"] == 0  # the first attempt had completed step 2 only
    assert "Traceback" not in result.stderr


def test_sigterm_stops_every_worker_and_the_run_resumes(reference: dict[int, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _past_first_checkpoint(out, "--nproc", "2")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("zhilu train:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "Traceback" not in stderr
    assert _group_ends(proc.pid), "a worker outlived the launcher"
    assert not list((out / "checkpoints").glob(".step-*")) and summary(out)["ended"] == "interrupted"
    train(out, *JOB, "--nproc", "2", "--resume")
    assert sha(out) == reference[2]


def test_sigusr1_checkpoints_at_the_next_step_and_stops(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _past_first_checkpoint(out, "--steps", "400")
    proc.send_signal(signal.SIGUSR1)  # what Slurm's --signal=USR1@SECONDS sends before a pre-emption
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    s = summary(out)
    assert s["ended"] == "preempted" and 2 <= s["last_step"] < 400
    assert (out / "checkpoints" / f"step-{s['last_step']:08d}" / "manifest.json").exists()
    assert f"pre-empted; a checkpoint of step {s['last_step']} is saved" in stderr


def test_no_socket_of_a_local_job_listens_beyond_loopback(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _past_first_checkpoint(out, "--steps", "400", "--nproc", "2")
    try:
        listening = _listening_sockets(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert listening, "the job listens nowhere: nothing was checked"
    beyond = [(host, port) for host, port in listening if host not in ("127.0.0.1", "::1")]
    assert beyond == []


def _past_first_checkpoint(out: Path, *extra: str) -> subprocess.Popen[str]:
    """A run started in a session of its own, once its checkpoint of step 2 is complete."""
    args = [sys.executable, "-m", "zhilu", "train", *MICRO, *JOB, *extra, "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    while not (out / "checkpoints" / "step-00000002" / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


def _listening_sockets(pgid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by a process of group ``pgid``."""
    import ipaddress

    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw, port = fields[1].split(":")
                words = bytes.fromhex(raw)
                packed = b"".join(words[i:i + 4][::-1] for i in range(0, size, 4))  # host-order words
                found.append((str(ipaddress.ip_address(packed)), int(port, 16)))
    return found


def _group_ends(pgid: int, within_s: float = 30.0) -> bool:
    """Whether every process of group ``pgid`` is gone (polled, up to ``within_s``)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_resuming_a_finished_run_is_refused_and_changes_nothing(reference: dict[int, str], tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB)
    before = (out / "summary.json").read_bytes()
    result = zhilu("train", *MICRO, *JOB, "--out", str(out), "--resume")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has finished its 6 steps" in errors[0] and "--steps larger than 6" in errors[0]
    assert (out / "summary.json").read_bytes() == before
    (out / "summary.json").unlink()  # as if killed after its last checkpoint: --resume completes it
    train(out, *JOB, "--resume")
    assert summary(out)["ended"] == "finished" and sha(out) == reference[1]


def test_resuming_a_run_killed_before_its_first_checkpoint_starts_it_again(reference: dict[int, str],
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert zhilu("train", *MICRO, *JOB, "--out", str(out), env={"ZHILU_FAULTS": "kill:step=2"}).returncode < 0
    result = zhilu("train", *MICRO, *JOB, "--out", str(out), "--resume")
    assert result.returncode == 0 and "has no checkpoint yet; its run starts again from step 0" in result.stderr
    assert sha(out) == reference[1]
