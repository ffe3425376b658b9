"""Whether a job fits in this machine's memory: checked before anything starts or is written.

What a process needs: its model states (weights, gradients, optimizer state) and activations.
zhilu's performance model predicts them for a model with a transformer shape
(:func:`zhilu.training.predict.predict`); for any other model (or a plan it does not cover)
they are bounded from below: the parameters' states by precision
(:data:`zhilu.perf.memory.STATE_BYTES`, fp32: 4 weight + 4 gradient + 8 AdamW moments) over
the sharding of the plan (tp x pp, then ZeRO over dp), plus the batch of int64 token ids.

What there is: on CUDA each device's free memory (``torch.cuda.mem_get_info``); on CPU
``MemAvailable`` of ``/proc/meminfo``, shared by the local processes, of which each process
still to start takes a baseline: the resident set of this process, which has imported torch,
measured now (``/proc/self/statm``). ``--launch.check_memory false`` skips the check.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from zhilu.config import JobConfig
from zhilu.errors import ZhiluError
from zhilu.launch.local import under_torchrun
from zhilu.perf.memory import GIB, STATE_BYTES, state_bytes
from zhilu.plan import Plan
from zhilu.spec import ModelSpec

MEMINFO = Path("/proc/meminfo")
STATM = Path("/proc/self/statm")
TOKEN_ID_BYTES = 8  # torch.int64: the dtype of zhilu's input and target token ids (cross_entropy's targets)


@dataclass(frozen=True)
class Need:
    """Bytes one process (one device) needs for the job, and where the figure comes from."""

    states: float  # weights, gradients, optimizer state, unsharded ZeRO-3 buffers
    activations: float  # activations in flight and the batch
    micro_batch: int  # samples per micro-batch on one replica
    source: str


def check(cfg: JobConfig, spec: ModelSpec, plan: Plan, device: str, nproc: int, hardware: str) -> None:
    """Refuse the job (a ZhiluError naming what to change) when it is predicted not to fit."""
    if not cfg.launch.check_memory:
        return
    need = per_process(cfg, spec, plan, device, nproc, hardware)
    if device == "cuda":
        have, where = _cuda_free(nproc)
        count, starting, baseline = 1, 0, 0
    else:
        available = _mem_available()
        if available is None:  # no /proc: not Linux, nothing measured to compare with
            return
        have, where = available, "available (MemAvailable in /proc/meminfo)"
        in_process = under_torchrun() or (nproc == 1 and cfg.launch.max_restarts == 0)  # as launch() runs it
        count, starting, baseline = nproc, 0 if in_process else nproc, _resident_bytes()
    terms = {"launch.nproc": starting * baseline, "model.name": count * need.states,
             "activations": count * need.activations}
    total = sum(terms.values())
    if total <= have:
        return
    # what alone does not fit is what to change: the model's states, else the processes, else the largest term
    field = next((k for k in ("model.name", "launch.nproc") if terms[k] > have), max(terms, key=lambda k: terms[k]))
    if field == "activations":
        field = "train.global_batch" if need.micro_batch > 1 or not cfg.train.seq_len else "train.seq_len"
    parts = [f"{_gib(need.states)} of weights, gradients and optimizer state",
             f"{_gib(need.activations)} of activations"]
    if starting:
        parts.append(f"{_gib(baseline)} for Python and torch (measured in this process)")
    who = f"{count} processes, each" if count > 1 else ("each device" if device == "cuda" else "1 process")
    raise ZhiluError(field, f"the job is predicted to need {_gib(total)} ({who}: {', '.join(parts)}; "
                            f"{need.source}) but {_gib(have)} is {where}; valid: "
                            f"{_remedy(field, cfg, need, baseline + need.states + need.activations)}, "
                            "or --launch.check_memory false to start it anyway")


def per_process(cfg: JobConfig, spec: ModelSpec, plan: Plan, device: str, nproc: int, hardware: str) -> Need:
    """The performance model's prediction for one process, else the lower bound of the states and the batch."""
    from zhilu.hardware import cluster
    from zhilu.training import predict

    estimate, _ = predict.predict(cfg, spec, plan, cluster(hardware) if hardware else None, device, nproc)
    if estimate is not None:
        m = estimate.memory
        return Need(m.weights + m.gradients + m.optimizer + m.buffers, m.activations, estimate.micro_batch,
                    "zhilu's performance model")
    params = spec.shape.num_params() if spec.shape is not None else spec.num_params()
    micro_batch = max(1, math.ceil(cfg.train.global_batch / (plan.dp * plan.mb)))
    precision = plan.precision if plan.precision in STATE_BYTES else "fp32"
    states = sum(state_bytes(params / (plan.tp * plan.pp), precision, plan.zero, plan.dp))
    batch = 2 * micro_batch * cfg.train.seq_len * TOKEN_ID_BYTES if spec.is_language_model else 0
    return Need(states, batch, micro_batch, f"at least: {params:,} parameters' states and the batch's token ids")


def _remedy(field: str, cfg: JobConfig, need: Need, each: float) -> str:
    if field == "launch.nproc":
        return f"fewer processes (each needs {_gib(each)})"
    if field == "model.name":
        return "a smaller model, or a plan that shards its states (zero=3, tp=, pp=)"
    tokens = f" (a micro-batch is {need.micro_batch} x {cfg.train.seq_len} tokens)" if cfg.train.seq_len else ""
    if field == "train.seq_len":
        return f"a shorter --seq-len{tokens}, or recompute=full in --plan"
    return f"a smaller --global-batch or --seq-len{tokens}, more micro-batches (mb= in --plan) or recompute=full"


def _cuda_free(nproc: int) -> tuple[int, str]:
    """The least free memory of the devices this job's local processes use, and which device that is."""
    import torch

    devices = [int(os.environ.get("LOCAL_RANK", 0))] if under_torchrun() else list(range(nproc))
    free = {i: torch.cuda.mem_get_info(i)[0] for i in devices}
    least = min(free, key=lambda i: free[i])
    return free[least], f"free on cuda:{least} (torch.cuda.mem_get_info)"


def _mem_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except OSError:
        return None
    return None


def _resident_bytes() -> int:
    """This process's resident set size: the second field of /proc/self/statm, in pages."""
    try:
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:,.2f} GiB"
