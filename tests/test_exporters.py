"""TensorBoard and Prometheus, read back with their own readers: tensorboard's event
accumulator, and prometheus_client's parser on what the endpoint serves while training runs;
the profiler's trace of one step, on every rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import MICRO, free_port, zhilu

NAMES = {"zhilu_train_step", "zhilu_train_loss", "zhilu_train_tokens_per_second", "zhilu_train_mfu_ratio",
         "zhilu_train_hfu_ratio", "zhilu_train_memory_peak_bytes", "zhilu_train_step_seconds",
         "zhilu_train_step_term_seconds", "zhilu_train_predicted_step_term_seconds", "zhilu_train_seconds_since_step",
         "zhilu_train_restarts"}


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_prometheus_serves_the_run_while_it_trains_and_tensorboard_files_read_back(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "run"
    args = [sys.executable, "-m", "zhilu", "train", *MICRO, "--steps", "400", "--train.log_every", "5",
            "--metrics.prometheus", str(port), "--metrics.tensorboard", "true", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        families: dict[str, list] = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                families = scrape(port)
            except OSError:
                families = {}
            if families.get("zhilu_train_step_seconds") and families["zhilu_train_step"][0].value >= 10:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        assert NAMES <= families.keys(), sorted(families)
        terms = {s.labels["term"] for s in families["zhilu_train_step_term_seconds"]}
        assert {"forward", "backward", "optimizer", "data", "other"} <= terms
        assert [s.name for s in families["zhilu_train_restarts"]][0] == "zhilu_train_restarts_total"
        assert 0 < families["zhilu_train_mfu_ratio"][0].value <= 1
        assert families["zhilu_train_seconds_since_step"][0].value >= 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    out = tmp_path / "tb"
    result = zhilu("train", *MICRO, "--steps", "10", "--train.log_every", "5", "--metrics.tensorboard", "true",
                   "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_s", "train/mfu", "breakdown/forward_s", "predicted/compute_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 5, 10]


def test_a_taken_or_invalid_prometheus_port_is_a_clear_error(tmp_path: Path) -> None:
    result = zhilu("train", *MICRO, "--steps", "2", "--metrics.prometheus", "70000", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr.startswith("error: metrics.prometheus"), result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = zhilu("train", *MICRO, "--steps", "2", "--metrics.prometheus", str(port),
                       "--out", str(tmp_path / "b"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: metrics.prometheus"), result.stderr
    assert "Traceback" not in result.stderr


def test_profile_step_writes_a_trace_of_that_step_on_every_rank(tmp_path: Path) -> None:
    result = zhilu("train", *MICRO, "--steps", "3", "--nproc", "2", "--metrics.profile_step", "2",
                   "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    traces = sorted((tmp_path / "run" / "profile").iterdir())
    assert [t.name for t in traces] == ["step-2-rank-0.json", "step-2-rank-1.json"]
    for trace in traces:
        names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        assert {"aten::mm", "gloo:all_reduce"} <= names

    bad = zhilu("train", *MICRO, "--metrics.profile_step", "-1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: metrics.profile_step"), bad.stderr
