"""Resolving a job against this machine, then starting its processes.

Three ways a job runs, one code path per rank (:func:`zhilu.train.loop.run`):

* one process: in this process, no process group;
* ``--nproc N``: N local processes started by torch elastic (the engine under torchrun),
  spawn start method, rendezvous on 127.0.0.1, restarts after a crash up to ``--max-restarts``;
* under ``torchrun``: this process is already one of torchrun's ranks.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from zhilu.config import JobConfig, dump_toml
from zhilu.errors import ZhiluError
from zhilu.models.presets import GPTConfig, preset
from zhilu.plan import Plan


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def prepare(cfg: JobConfig) -> tuple[JobConfig, Plan, GPTConfig]:
    """Fill in defaults from this machine and check everything before any process starts.

    Returns the resolved config (what ``config.toml`` records), the plan and the model shape.
    """
    import torch

    from zhilu.data.corpus import load_corpus

    launch = cfg.launch
    device = launch.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ZhiluError("launch.device", "cuda was asked for but no CUDA device is visible; valid here: cpu or auto")
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if launch.nproc not in (0, local):
            raise ZhiluError("launch.nproc", f"under torchrun the processes are torchrun's ({local} on this node); drop --nproc")
        nproc = local
    else:
        nproc = launch.nproc or (torch.cuda.device_count() if device == "cuda" else 1)
        world = nproc
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ZhiluError("launch.nproc", f"{nproc} processes but {torch.cuda.device_count()} CUDA devices; valid: 1-{torch.cuda.device_count()}")

    m = cfg.model
    shape = {k: getattr(m, k) for k in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden") if getattr(m, k)}
    model_cfg = preset(m.preset, **shape)
    seq_len = cfg.train.seq_len or model_cfg.max_seq_len
    model_cfg = replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, seq_len))

    hw_source = _hardware(cfg.parallel.hardware, cfg.parallel.plan.strip() == "auto", device, nproc)
    if cfg.parallel.plan.strip() == "auto":
        from zhilu.hardware import cluster
        from zhilu.perf import job

        if not hw_source:
            raise ZhiluError("parallel.hardware", "--plan auto needs to know this GPU: run `zhilu calibrate`, or give "
                             "a preset (a100-40gb, a100-80gb, h100-sxm, h200, v100-32gb) or a hardware file")
        plan, estimate = job.auto(model_cfg, seq_len, cfg.train.global_batch, world, cluster(hw_source), device,
                                  nodes_of=nproc)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"plan auto: {job.spec(plan)}, predicted {estimate.step_time_s * 1e3:,.0f} ms/step "
                  f"(the fastest that fits, on {hw_source})", flush=True)
        cfg = replace(cfg, parallel=replace(cfg.parallel, plan=job.spec(plan)))
    else:
        plan = Plan.parse(cfg.parallel.plan, world)
    plan.check_model(model_cfg)
    plan.check_batch(cfg.train.global_batch)

    corpus = load_corpus(cfg.data.path or None, cfg.data.val_fraction)
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) <= seq_len:
            raise ZhiluError("train.seq_len", f"{seq_len} is longer than the {split} data ({len(tokens)} tokens); "
                             f"valid: at most {len(tokens) - 1}, or more data")
    if corpus.vocab_size > model_cfg.vocab_size:
        raise ZhiluError("model.preset", f"the data has token ids up to {corpus.vocab_size - 1} but {m.preset} has a "
                         f"vocabulary of {model_cfg.vocab_size}; choose a preset with a larger vocabulary")

    if launch.port and not under_torchrun():
        _check_port_free(launch.port)

    out = Path(cfg.run.out or f"runs/{m.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_run_dir(out, cfg.checkpoint.resume, restarted=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0)

    resolved = replace(
        cfg,
        train=replace(cfg.train, seq_len=seq_len),
        parallel=replace(cfg.parallel, hardware=hw_source),
        launch=replace(launch, device=device, nproc=nproc),
        run=replace(cfg.run, out=str(out)),
    )
    if int(os.environ.get("RANK", 0)) == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "config.toml.tmp"
        tmp.write_text(dump_toml(resolved))
        os.replace(tmp, out / "config.toml")
    return resolved, plan, model_cfg


def _hardware(name: str, calibrate: bool, device: str, nproc: int) -> str:
    """The hardware the prediction uses: ``name``, else this machine's calibration (measured now for
    ``--plan auto`` when there is none, outside torchrun), else the device's preset."""
    import torch

    from zhilu.perf import job

    if not name and calibrate and not under_torchrun():
        from zhilu import hardware
        from zhilu.calibrate import calibrate as measure

        path = hardware.calibrated_path(device, nproc)
        if not path.exists():
            print(f"plan auto: calibrating this machine first ({nproc} x {device}; saved to {path})", flush=True)
            try:
                hardware.save(measure(device, nproc), path)
            except OSError as e:
                raise ZhiluError("parallel.hardware", f"cannot write the calibration to {path} ({e.strerror}); "
                                 "set XDG_CACHE_HOME, or give a preset or hardware file") from None
    gpu = torch.cuda.get_device_name() if device == "cuda" else ""
    try:
        return job.hardware(name, device, nproc, gpu)[1]
    except ZhiluError as e:
        raise ZhiluError("parallel.hardware", e.message) from None


def launch(cfg: JobConfig, plan: Plan, model_cfg: GPTConfig) -> dict[str, Any] | None:
    """Run the prepared job; returns rank 0's summary where this process can see it."""
    from zhilu.train import loop

    n = cfg.launch.nproc
    if under_torchrun() or (n == 1 and cfg.launch.max_restarts == 0):
        return loop.run(cfg, plan, model_cfg)
    return run_local(loop.run, (cfg, plan, model_cfg), n, cfg.launch.port, cfg.launch.max_restarts)[0]


def run_local(fn: Callable[..., Any], args: tuple, nproc: int, port: int = 0, max_restarts: int = 0) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes under torch elastic; their return values by rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Restarted workers must not read the previous attempt's addresses from a store shared
    # with the rendezvous (pytorch/pytorch#135712): give each attempt its own store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        local_addr="127.0.0.1",
        max_restarts=max_restarts,
        start_method="spawn",
        monitor_interval=0.2,
    )
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise TrainingFailed(f"rank {rank} failed (exit code {failure.exitcode}); its traceback is above") from None


class TrainingFailed(Exception):
    """A rank crashed and no restarts were left (exit code 1)."""


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ZhiluError("launch.port", f"port {port} is in use; valid: a free port, or 0 to pick one") from None


def _check_run_dir(out: Path, resume: bool, restarted: bool) -> None:
    """A new run needs a fresh directory; a resumed one an intact checkpoint. A run that
    torchrun restarted continues from its latest checkpoint, or from the start if it has none."""
    from zhilu.train.checkpoint import latest_checkpoint, verify

    latest = latest_checkpoint(out)
    if resume or restarted:
        if latest is not None:
            verify(latest)
        elif resume:
            raise ZhiluError("checkpoint.resume", f"{out} has no checkpoint to resume from; run without --resume")
    elif (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        raise ZhiluError("run.out", f"{out} already holds a run; pass --resume to continue it, or choose another --out")
