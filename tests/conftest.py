"""Shared helpers: run the real ``zhilu`` command and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from zhilu.config import load_config
from zhilu.models.gpt import build_model
from zhilu.models.presets import preset
from zhilu.training.checkpoint import latest_checkpoint, load_model
from zhilu.training.checkpoint_files import read_manifest
from zhilu.training.dcp_reader import CheckpointReader
from zhilu.training.optim import ADAMW_EPS

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
    """Per-step losses within a relative 1e-5, and final parameters within 1e-6 of the reference.

    Except for the few parameters whose gradient is at rounding level (a byte the batches
    almost never use): AdamW moves such a component by lr * g / (sqrt(v) + eps), and with
    sqrt(v) below eps (1e-8) that is lr times the rounding error of g divided by 1e-8, so a
    different reduction order changes it by up to about lr per step. Those components, found
    from the reference's own second moment v, are held to what AdamW can move them at all
    (lr per step); a different computation changes the others by far more than 1e-6.
    """
    got = torch.tensor(losses(run), dtype=torch.float64)
    want = torch.tensor(losses(reference), dtype=torch.float64)
    assert len(got) == len(want) == steps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    params, ref_params = final_params(run, n_layers), final_params(reference, n_layers)
    assert params.keys() == ref_params.keys()
    cfg = load_config(str(reference / "config.toml"))
    rms = gradient_rms(reference, ref_params, cfg.train.beta2, steps)
    for name, p in params.items():
        settled = rms[name] >= ADAMW_EPS
        torch.testing.assert_close(p[settled], ref_params[name][settled], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(p[~settled], ref_params[name][~settled], rtol=0, atol=cfg.train.lr * steps,
                                   msg=f"{name}, gradient at rounding level")


def gradient_rms(run: Path, params: dict[str, torch.Tensor], beta2: float, steps: int) -> dict[str, torch.Tensor]:
    """Each parameter component's root-mean-square gradient, from AdamW's bias-corrected second
    moment in the run's latest checkpoint."""
    path = latest_checkpoint(run)
    state = {"optim": {f"state.{k}.exp_avg_sq": torch.empty_like(v) for k, v in params.items()}}
    dcp.load(state, storage_reader=CheckpointReader(path, set(read_manifest(path)["files"])), no_dist=True)
    return {k: (state["optim"][f"state.{k}.exp_avg_sq"] / (1 - beta2**steps)).sqrt() for k in params}


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


KEY = "sk-test-key"  # the API key the serving tests start servers with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``zhilu serve RUN_DIR ARGS`` on a free loopback port, until closed."""

    def __init__(self, run: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ZHILU_API_KEY": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "zhilu", "serve", str(run), "--port", str(self.port),
                                      *args], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read() if self.proc.stderr else "the server exited")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not answer /healthz")

    def client(self, key: str = KEY) -> Any:
        """An ``openai.OpenAI`` client of this server."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, body, {"Authorization": f"Bearer {key}",
                                                             "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
