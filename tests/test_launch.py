"""The same job under torchrun: two agents rendezvousing on 127.0.0.1 as two "nodes" of one
process each compute exactly what two local processes compute."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import MICRO, losses, zhilu

JOB = [*MICRO, "--steps", "6", "--global-batch", "8", "--plan", "dp=2,zero=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_match_two_local_processes(tmp_path: Path) -> None:
    local = tmp_path / "local"
    result = zhilu("train", *JOB, "--nproc", "2", "--out", str(local))
    assert result.returncode == 0, result.stderr

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
