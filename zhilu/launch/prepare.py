"""Resolving a job against this machine, then starting its processes.

Three ways a job runs, one code path per rank (:func:`zhilu.training.trainer.run`):

* one process without restarts: in this process, no process group;
* ``--nproc N`` (or restarts): N local processes started by torch elastic (the engine under
  torchrun), restarted after a crash or a hang up to ``--max-restarts`` times
  (:mod:`zhilu.launch.supervise`, :mod:`zhilu.launch.local`);
* under ``torchrun``: this process is already one of torchrun's ranks.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from zhilu.config import JobConfig, dump_toml
from zhilu.durable import write_atomic
from zhilu.errors import ZhiluError
from zhilu.launch import fits, run_dir
from zhilu.launch.local import under_torchrun
from zhilu.models.registry import spec_of
from zhilu.plan import Plan
from zhilu.spec import ModelSpec


def prepare(cfg: JobConfig, spec: ModelSpec | None = None, dry_run: bool = False) -> tuple[JobConfig, Plan, ModelSpec]:
    """Fill in defaults from this machine and check everything before any process starts.

    Returns the resolved config (what ``config.toml`` records), the plan and the model's spec
    (``spec`` if given, else the one ``cfg.model`` names). ``dry_run``: write nothing.
    """
    import torch

    from zhilu.data.batches import describe

    launch = cfg.launch
    device = launch.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ZhiluError("launch.device", "cuda was asked for but no CUDA device is visible; valid here: cpu or auto")
    if cfg.metrics.tp_comm and (device != "cpu" or cfg.model.compile):
        raise ZhiluError("metrics.tp_comm", "times the waits a CPU's clock sees, in eager mode; "
                                            "valid with --device cpu and --model.compile false")
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if launch.nproc not in (0, local):
            raise ZhiluError("launch.nproc", f"under torchrun the processes are torchrun's ({local} on this node); drop --nproc")
        nproc = local
    else:
        nproc = launch.nproc or (torch.cuda.device_count() if device == "cuda" else _world_of(cfg.parallel.plan))
        world = nproc
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ZhiluError("launch.nproc", f"{nproc} processes but {torch.cuda.device_count()} CUDA devices; valid: 1-{torch.cuda.device_count()}")

    if spec is not None and spec.source is None and nproc > 1 and not under_torchrun():
        _check_picklable(spec, nproc)
    spec = spec or spec_of(cfg)
    seq_len = 0
    if spec.is_language_model:
        seq_len = cfg.train.seq_len or spec.max_seq_len or 0
        if seq_len < 1:
            raise ZhiluError("train.seq_len", f"{spec.name} declares no max_seq_len; give --seq-len")
        if spec.max_seq_len and seq_len > spec.max_seq_len:
            raise ZhiluError("train.seq_len", f"{seq_len} is longer than {spec.name}'s max_seq_len "
                                              f"{spec.max_seq_len}; valid: at most {spec.max_seq_len}")
    cfg = replace(cfg, train=replace(cfg.train, seq_len=seq_len))

    auto = cfg.parallel.plan.strip() == "auto"
    hw_source = _hardware(cfg.parallel.hardware, auto, device, nproc)
    if auto:
        plan = _auto_plan(cfg, spec, hw_source, device, world, nproc)
        cfg = replace(cfg, parallel=replace(cfg.parallel, plan=plan.spec()))
    else:
        plan = Plan.parse(cfg.parallel.plan, world)
    plan = plan.resolved(device)
    spec.check_plan(plan)
    fits.check(cfg, spec, plan, device, nproc, hw_source)  # before the data: a huge batch is refused, not built
    plan.check_batch(cfg.train.global_batch)
    data = describe(cfg, spec)  # the data exists, is intact and fits the model

    if launch.port and not under_torchrun():
        _check_port_free(launch.port)

    stem = Path(spec.name).name.replace(":", "-")
    out = Path(cfg.run.out or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    rank0 = int(os.environ.get("RANK", 0)) == 0  # under torchrun only global rank 0 locks and writes
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    run_dir.check(out, cfg.checkpoint.resume, restarted, rank0, cfg.train.steps)
    run_dir.check_data(out, data.fingerprint, data.description, cfg.checkpoint.resume or restarted,
                       cfg.data.allow_changed)

    resolved = replace(
        cfg,
        parallel=replace(cfg.parallel, hardware=hw_source),
        launch=replace(launch, device=device, nproc=nproc),
        run=replace(cfg.run, out=str(out)),
    )
    if rank0 and not dry_run:
        run_dir.acquire(out)  # held until launch() ends: a second run on `out` is refused
        write_atomic(out / "config.toml", dump_toml(resolved))
        run_dir.write_data(out, data.fingerprint, data.description)
    return resolved, plan, spec


def dry_run(cfg: JobConfig, plan: Plan, spec: ModelSpec) -> None:
    """Print what a prepared job would run: its configuration, its data and its prediction."""
    from zhilu.data.batches import describe
    from zhilu.hardware import cluster
    from zhilu.training import predict

    print(f"# zhilu train --dry-run: {spec.name} ({spec.num_params() / 1e6:.1f}M params), plan {plan.describe()} "
          f"on {cfg.launch.nproc} x {cfg.launch.device}; nothing was started or written")
    print(dump_toml(cfg), end="")
    print(f"# data: {describe(cfg, spec).description}")
    hw = cluster(cfg.parallel.hardware) if cfg.parallel.hardware else None
    estimate, why_not = predict.predict(cfg, spec, plan, hw, cfg.launch.device, cfg.launch.nproc)
    print(f"# {predict.describe(estimate, cfg.parallel.hardware)}" if estimate else f"# no prediction: {why_not}")


def _check_picklable(spec: ModelSpec, nproc: int) -> None:
    """A spec built in Python travels to the worker processes by pickle."""
    import pickle

    try:
        pickle.dumps(spec)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ZhiluError("model.name", f"{spec.name} cannot be sent to {nproc} processes ({str(e).splitlines()[0]}); "
                                       "valid: a spec whose functions are module-level (or functools.partial of "
                                       "them), or a FILE.py:NAME each process loads") from None


def _world_of(plan: str) -> int:
    """Processes a CPU job with no --nproc runs: the product of the degrees its plan names (1 without)."""
    n = 1
    for item in plan.split(","):
        key, _, value = item.partition("=")
        if key.strip() in ("dp", "tp", "pp") and value.strip().isdigit():
            n *= max(1, int(value))
    return n


def _auto_plan(cfg: JobConfig, spec: ModelSpec, hw_source: str, device: str, world: int, nproc: int) -> Plan:
    from zhilu.hardware import cluster
    from zhilu.perf import job

    if not hw_source:
        raise ZhiluError("parallel.hardware", "--plan auto needs to know this GPU: run `zhilu calibrate`, or give "
                         "a preset (a100-40gb, a100-80gb, h100-sxm, h200, v100-32gb) or a hardware file")
    if spec.shape is None:
        raise ZhiluError("parallel.plan", f"auto needs the model's transformer shape, and {spec.name} declares none "
                                          "(ModelSpec.shape); give a plan such as dp=2")
    plan, estimate, alternatives = job.auto(spec.shape, cfg.train.seq_len, cfg.train.global_batch, world,
                                            cluster(hw_source), device, nodes_of=nproc)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"plan auto: {plan.spec()}, predicted {estimate.step_time_s * 1e3:,.0f} ms/step "
              f"(the fastest that fits, on {hw_source})", flush=True)
        for line in alternatives:
            print(f"  {line}", flush=True)
    return plan


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


def launch(cfg: JobConfig, plan: Plan, spec: ModelSpec) -> dict[str, Any] | None:
    """Run the prepared job; returns rank 0's summary where this process can see it.

    Several processes, or restarts: zhilu's launcher (:mod:`zhilu.launch.supervise`). One
    process without restarts runs here; a signal stops it as it would the launcher's workers.
    A spec from ``--model`` is resolved again in each process; one built in Python is pickled to them."""
    from zhilu.launch.supervise import supervise

    try:
        if under_torchrun():
            from zhilu.training import trainer

            return trainer.run(cfg, plan, spec)
        if cfg.launch.nproc == 1 and cfg.launch.max_restarts == 0:
            return _run_here(cfg, plan, spec)
        return supervise(cfg, plan, spec)
    finally:
        run_dir.release(Path(cfg.run.out))


def _run_here(cfg: JobConfig, plan: Plan, spec: ModelSpec) -> dict[str, Any] | None:
    import signal

    from zhilu.launch.local import Interrupted
    from zhilu.launch.supervise import remove_partial_saves
    from zhilu.training import trainer
    from zhilu.training.summary import write_ended

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    out = Path(cfg.run.out)
    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    try:
        return trainer.run(cfg, plan, spec)
    except (Interrupted, KeyboardInterrupt) as e:
        remove_partial_saves(out)
        write_ended(out, "interrupted", f"stopped by {e if isinstance(e, Interrupted) else 'SIGINT'}", [])
        raise
    except ZhiluError:
        raise
    except Exception as e:
        write_ended(out, "failed", f"{type(e).__name__}: {e}", [])
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ZhiluError("launch.port", f"port {port} is in use; valid: a free port, or 0 to pick one") from None
