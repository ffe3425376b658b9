"""Bad input gets one line starting ``error:`` that names the field, exit code 2, no
traceback, and nothing written."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from conftest import zhilu


def assert_one_line_error(result, field: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {field}"), lines[0]
    assert "Traceback" not in result.stderr


CASES = {
    "unknown key": (["--train.stepz", "5"], "train.stepz"),
    "unknown section": (["--trainer.steps", "5"], "trainer"),
    "wrong type": (["--steps", "ten"], "train.steps"),
    "negative steps": (["--steps", "-1"], "train.steps"),
    "bad bool": (["--model.compile", "maybe"], "model.compile"),
    "unknown model": (["--model", "gpt-9"], "model.name"),
    "unknown device": (["--device", "tpu"], "launch.device"),
    "unknown flag": (["--stepps", "5"], "arguments"),
    "degrees not the world size": (["--nproc", "2", "--plan", "dp=4"], "parallel.plan"),
    "unknown plan key": (["--plan", "dq=2"], "parallel.plan"),
    "zero stage": (["--plan", "zero=4"], "parallel.plan"),
    "batch not divisible": (["--nproc", "2", "--plan", "dp=2,mb=2", "--global-batch", "6"], "train.global_batch"),
    "missing data": (["--data", "/nonexistent/corpus.txt"], "data.path"),
    "heads not dividing hidden": (["--model.n_heads", "5"], "model.n_heads"),
    "sequence longer than the data": (["--data", "SMALL", "--seq-len", "256"], "train.seq_len"),
    "cuda not there": (["--device", "cuda"], "launch.device"),
    "tp not dividing the heads": (["--nproc", "4", "--plan", "tp=4"], "parallel.plan"),
    "pp more than the layers": (["--nproc", "2", "--plan", "pp=2", "--model.n_layers", "1"], "parallel.plan"),
    "interleaved micro-batches": (["--nproc", "2", "--plan", "pp=2,mb=3,schedule=interleaved"], "parallel.plan"),
    "too few micro-batches": (["--nproc", "2", "--plan", "pp=2,mb=1"], "parallel.plan"),
    "sequence parallel without tp": (["--plan", "sp=true"], "parallel.plan"),
    "model averaging with zero": (["--nproc", "2", "--plan", "dp=2,zero=3,avg_every=2"], "parallel.plan"),
    "tp_comm timed under compile": (["--metrics.tp_comm", "true", "--model.compile", "true"], "metrics.tp_comm"),
    "unknown hardware": (["--parallel.hardware", "tpu-v9"], "parallel.hardware"),
    "hardware file missing": (["--parallel.hardware", "/nonexistent/hw.toml"], "parallel.hardware"),
    "negative seed": (["--seed", "-1"], "train.seed"),  # numpy's default_rng refuses it in every rank
    "seed past torch's generators": (["--seed", "99999999999999999999"], "train.seed"),
}


@pytest.mark.parametrize("args, field", CASES.values(), ids=CASES.keys())
def test_bad_train_input(args: list[str], field: str, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus " * 10)
    args = [str(small) if a == "SMALL" else a for a in args]
    out = tmp_path / "run"
    result = zhilu("train", "--out", str(out), *args)
    assert_one_line_error(result, field)
    assert not out.exists()


def test_empty_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(zhilu("train", "--data", str(empty), "--out", str(tmp_path / "run")), "data.path")


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = zhilu("train", "--nproc", "2", "--launch.port", str(port), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "launch.port")


def test_bad_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text("[train]\nsteps = 'many'\n")
    assert_one_line_error(zhilu("train", str(bad)), "train.steps")
    bad.write_text("[train\n")
    assert_one_line_error(zhilu("train", str(bad)), "config")
    assert_one_line_error(zhilu("train", str(tmp_path / "missing.toml")), "config")


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert_one_line_error(zhilu("train", "--out", str(out)), "run.out")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_unknown_command() -> None:
    assert_one_line_error(zhilu("trian"), "command")


def test_data_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    result = zhilu("train", "--data", str(fifo), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "data.path")
    assert "not a regular file" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_data_folder_reads_only_its_regular_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("tiny corpus " * 200)
    os.mkfifo(corpus / "b.txt")
    result = zhilu("train", "--dry-run", "--data", str(corpus), "--seq-len", "32", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert f"folder {corpus} (1 files" in result.stdout


def test_a_directory_as_the_config_file_is_named_a_directory(tmp_path: Path) -> None:
    result = zhilu("train", str(tmp_path))
    assert_one_line_error(result, "config")
    assert "is a directory" in result.stderr


@pytest.mark.parametrize("where", ["a directory", "a directory named .toml", "under a file", "unwritable"])
def test_calibrate_refuses_an_unusable_out_before_measuring(where: str, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("data")
    (tmp_path / "hw.toml").mkdir()
    out = {"a directory": tmp_path, "a directory named .toml": tmp_path / "hw.toml",
           "under a file": afile / "hw.toml", "unwritable": Path("/sys/hw.toml")}[where]
    result = zhilu("calibrate", "--out", str(out))
    assert_one_line_error(result, "out")
    assert "calibrating" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "hw.toml"]
    assert not list((tmp_path / "hw.toml").iterdir())  # nothing measured or written
