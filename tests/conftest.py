"""Shared helpers: run the real ``zhilu`` command and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zhilu.models.gpt import build_model
from zhilu.models.presets import preset
from zhilu.training.checkpoint import latest_checkpoint, load_model

# A model small enough that a 10-step, 2-process run takes seconds.
MICRO = [
    "--model.n_layers", "2", "--model.hidden", "64", "--model.n_heads", "4", "--model.ffn_hidden", "128",
    "--seq-len", "32", "--train.log_every", "1", "--train.eval_batches", "2", "--train.sample_tokens", "0",
]


def train(out: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    """``zhilu train MICRO ARGS --out OUT``, which must succeed."""
    result = zhilu("train", *MICRO, "--out", str(out), *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def final_params(out: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """The latest checkpoint of a run, whatever its layout, loaded into one whole model."""
    model = build_model(preset("gpt-tiny", n_layers=n_layers, hidden=64, n_heads=4, ffn_hidden=128), seed=123)
    load_model(latest_checkpoint(out), model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(run: Path, reference: Path, steps: int, n_layers: int) -> None:
    """Per-step losses within a relative 1e-5 and final parameters within 1e-5 of the reference.

    Parameters (of size 0.02 to 1) are compared by absolute difference: AdamW divides each
    gradient by sqrt(v) + eps, so for a component whose gradient is near zero (~1e-11, a byte
    seen once) a fp32 rounding difference of ~1e-9, from a different reduction order, moves
    that weight by up to lr * 1e-9 / eps ~ 1e-6. That is rounding, not a different computation.
    """
    got = torch.tensor(losses(run), dtype=torch.float64)
    want = torch.tensor(losses(reference), dtype=torch.float64)
    assert len(got) == len(want) == steps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    params, ref_params = final_params(run, n_layers), final_params(reference, n_layers)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-5, msg=name)


def zhilu(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m zhilu ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TORCHELASTIC_RUN_ID", None)
    args_ = [sys.executable, "-m", "zhilu", *args]
    with subprocess.Popen(args_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
            raise
    return subprocess.CompletedProcess(args_, proc.returncode, stdout, stderr)


def losses(run_dir: Path) -> list[float]:
    """Per-step training losses from metrics.jsonl, in step order (one line per step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
