"""The same job under torchrun: two agents rendezvousing on 127.0.0.1 as two "nodes" of one
process each compute exactly what two local processes compute, and torchrun's restarts
recover a killed rank as zhilu's own launcher does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MICRO, losses, zhilu

JOB = [*MICRO, "--steps", "6", "--global-batch", "8", "--plan", "dp=2,zero=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    result = zhilu("train", *JOB, "--nproc", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_two_torchrun_nodes_match_two_local_processes(local: Path, tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "zhilu-test",
             "--local-addr", "127.0.0.1", "-m", "zhilu", "train", *JOB, "--out", str(nodes)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    assert losses(nodes) == losses(local)


def test_torchrun_restarts_a_killed_rank_from_the_newest_checkpoint(local: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"} | {"ZHILU_FAULTS": "kill:rank=1:step=4"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
         "-m", "zhilu", "train", *JOB, "--checkpoint-every", "2", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["restart_causes"][0]["resumed_from_step"] == 2
    assert summary["final_params_sha256"] == json.loads((local / "summary.json").read_text())["final_params_sha256"]
