"""Shared helpers: run the real ``zhilu`` command and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A model small enough that a 10-step, 2-process run takes seconds.
MICRO = [
    "--model.n_layers", "2", "--model.hidden", "64", "--model.n_heads", "4", "--model.ffn_hidden", "128",
    "--seq-len", "32", "--train.log_every", "1", "--train.eval_batches", "2", "--train.sample_tokens", "0",
]


def zhilu(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m zhilu ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TORCHELASTIC_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "zhilu", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def losses(run_dir: Path) -> list[float]:
    """Per-step training losses from metrics.jsonl, in step order (one line per step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
