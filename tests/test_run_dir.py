"""The run directory: what --out may name, one run at a time in it, and what --resume continues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import MICRO, losses, train, zhilu
from test_cli_errors import assert_one_line_error

from zhilu.training.checkpoint import latest_checkpoint

JOB = ["--steps", "3", "--global-batch", "8"]
HANG_GUARD_S = 240  # as conftest.zhilu's timeout: a run that never saves fails the test instead of hanging it


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run of the micro model; tests only read it (dry runs and refusals)."""
    return train(tmp_path_factory.mktemp("finished") / "run", *JOB)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- where a run may go -----------------------------------------------------------------------------

def test_a_directory_holding_other_files_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    result = zhilu("train", "--out", str(notes))
    assert_one_line_error(result, "run.out")
    assert "no zhilu run" in result.stderr and "todo.txt" in result.stderr
    assert _tree(notes) == {"todo.txt": b"keep me"}


@pytest.mark.parametrize("out", ["/", "/etc"])
def test_system_directories_are_refused(out: str) -> None:
    before = sorted(os.listdir(out))
    assert_one_line_error(zhilu("train", "--out", out), "run.out")
    assert sorted(os.listdir(out)) == before


def test_an_empty_directory_takes_a_new_run(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = zhilu("train", "--dry-run", "--out", str(empty))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_file_or_a_path_under_a_file_is_refused(where: str, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("data")
    out = afile if where == "a file" else afile / "run"
    result = zhilu("train", "--out", str(out))
    assert_one_line_error(result, "run.out")
    assert str(afile) in result.stderr and "a file" in result.stderr
    assert afile.read_text() == "data"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs, where nobody may create a directory")
def test_a_place_that_cannot_be_written_is_refused() -> None:
    result = zhilu("train", "--out", "/sys/zhilu-run")
    assert_one_line_error(result, "run.out")
    assert "cannot write in /sys" in result.stderr


# -- one run at a time ------------------------------------------------------------------------------

@contextmanager
def _running(out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A run of many steps, checkpointing every 2, from the moment it has saved a checkpoint;
    its process group is killed (-9) on the way out."""
    args = [sys.executable, "-m", "zhilu", "train", *MICRO, "--steps", "100000", "--global-batch", "8",
            "--checkpoint-every", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    log = out.with_name(out.name + ".log")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=sink, env=env, start_new_session=True)
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while latest_checkpoint(out) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_second_run_on_a_directory_in_use_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with _running(out) as first:
        assert (out / ".lock").read_text().split() == [str(first.pid)]
        config = (out / "config.toml").read_bytes()
        for extra in ([], ["--resume"]):
            result = zhilu("train", *MICRO, "--steps", "7", "--out", str(out), *extra)
            assert_one_line_error(result, "run.out")
            assert f"is in use by another zhilu run (pid {first.pid})" in result.stderr
            assert (out / "config.toml").read_bytes() == config  # its steps=7 never reached the disk
        assert first.poll() is None


# -- --resume continues the same run ----------------------------------------------------------------

def test_resume_needs_the_run_directory() -> None:
    result = zhilu("train", "--resume")
    assert_one_line_error(result, "run.out")
    assert "--out" in result.stderr


def test_resume_takes_the_runs_own_settings_and_names_a_changed_schedule(tmp_path: Path) -> None:
    out = train(tmp_path / "run", *JOB)
    result = zhilu("train", "--out", str(out), "--resume", "--steps", "5")  # no MICRO: the run's own shape
    assert result.returncode == 0, result.stderr[-3000:]
    named = [line for line in result.stderr.splitlines() if "resuming with" in line]
    assert named == ["zhilu train: resuming with train.steps=5 (the run was saved with 3): the learning-rate "
                     "schedule changes"]
    assert len(losses(out)) == 5


def test_resume_names_every_setting_that_changes_the_trajectory(finished: Path) -> None:
    result = zhilu("train", "--out", str(finished), "--resume", "--dry-run", "--seed", "1", "--train.lr", "0.001",
                   "--global-batch", "16", "--steps", "5")
    assert result.returncode == 0, result.stderr
    named = sorted(line.split("resuming with ")[1].split("=")[0] for line in result.stderr.splitlines())
    assert named == ["train.global_batch", "train.lr", "train.seed", "train.steps"], result.stderr


def test_resume_on_another_layout_is_silent(finished: Path) -> None:
    result = zhilu("train", "--out", str(finished), "--resume", "--dry-run", "--plan", "dp=2,zero=3", "--steps", "5")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "train.steps" not in line] == []
    assert "nproc = 2" in result.stdout  # a new plan without --nproc sets the process count, as for a new run


@pytest.mark.parametrize("args, field, text", [
    (["--model.n_layers", "4"], "model.n_layers", "was trained with 2, this run asks for 4"),
    (["--model", "gpt2-124m"], "model.name", "was trained with 'gpt-tiny', this run asks for 'gpt2-124m'"),
])
def test_resume_refuses_another_model(args: list[str], field: str, text: str, finished: Path) -> None:
    before = _tree(finished)
    result = zhilu("train", "--out", str(finished), "--resume", *args)
    assert_one_line_error(result, field)
    assert f"{finished} {text}" in result.stderr
    assert _tree(finished) == before


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    result = zhilu("train", "--out", str(notes), "--resume")
    assert_one_line_error(result, "run.out")
    assert "no zhilu run to resume" in result.stderr
    assert _tree(notes) == {"todo.txt": b"keep me"}


def test_resume_of_a_directory_that_holds_nothing_yet_starts_the_run(tmp_path: Path) -> None:
    out = tmp_path / "requeued"  # a job killed before it wrote anything, then requeued with --resume
    result = zhilu("train", *MICRO, *JOB, "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"zhilu: {out} holds no run yet; it starts from step 0" in result.stderr
    assert len(losses(out)) == 3
