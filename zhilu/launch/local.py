"""Local processes under torch elastic (the engine under torchrun).

``run_local`` starts N processes for one attempt of a job, forked from a forkserver that has
imported torch and the job's module once (the next attempt forks from the same one): they
meet through a rendezvous file in a private temporary folder (no TCP store of the launcher
listens anywhere) and rank 0's store listens on 127.0.0.1 only
(:func:`zhilu.parallel.mesh.join_group`). Restarts are :mod:`zhilu.launch.supervise`'s; under
``torchrun`` this process is already one of torchrun's ranks (:func:`under_torchrun`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


STORE_PORT = "ZHILU_STORE_PORT"  # read by zhilu.parallel.mesh in the workers
MONITOR_INTERVAL_S = 0.2  # how often torch elastic's agent polls the workers
FAILED_WORKER_WAIT_S = 5 * MONITOR_INTERVAL_S


class TrainingFailed(Exception):
    """A rank crashed and no restarts were left (exit code 1)."""


@dataclass
class WorkerFailed(Exception):
    """A worker of one attempt ended badly: which rank, its exit code, the signal that killed it,
    and, when it raised, the exception's last line and traceback."""

    rank: int
    exitcode: int
    signal: str  # e.g. SIGKILL; empty when the process exited by itself
    message: str = ""  # the last line of its exception, e.g. "ValueError: ..."
    traceback: str = ""

    def __str__(self) -> str:
        how = f"was killed by {self.signal}" if self.signal else f"exited with code {self.exitcode}"
        return f"rank {self.rank} {how}" + (f" ({self.message})" if self.message else "")


class Interrupted(Exception):
    """The launcher was sent SIGTERM, SIGINT, SIGHUP or SIGQUIT; the workers are stopped."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def run_local(fn: Callable[..., Any], args: tuple, nproc: int, port: int = 0) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes once; their return values by rank."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The workers make their own store (pytorch/pytorch#135712), on the port the agent picks
    # (MASTER_PORT) or the one given.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ["ZHILU_LOCAL_LAUNCH"] = "1"  # rank 0's store on 127.0.0.1 (zhilu.parallel.mesh)
    # The agent's log of a failure (and of the workers it then stops) is pages of log lines;
    # zhilu says it in one, with the traceback of a worker that raised (WorkerFailed).
    for name in ("torch.distributed.elastic", "torch.multiprocessing.spawn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if port:
        os.environ[STORE_PORT] = str(port)
    # Forked from a clean, single-threaded server, not from this process (whose OpenMP pool
    # may be running): each worker starts without importing torch again.
    multiprocessing.set_forkserver_preload(["torch", fn.__module__])
    with tempfile.TemporaryDirectory(prefix="zhilu-rdzv-") as folder:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex[:8],
            rdzv_backend="c10d",
            rdzv_endpoint=os.path.join(folder, "rendezvous"),
            rdzv_configs={"store_type": "file"},
            local_addr="127.0.0.1",
            max_restarts=0,
            start_method="forkserver",
            monitor_interval=MONITOR_INTERVAL_S,
        )
        try:
            return elastic_launch(config, _worker)(fn, *args)
        except SignalException as e:
            raise Interrupted(int(e.sigval)) from None
        except ChildFailedError as e:
            rank, failure = _first_failure(e)
            name = failure.signal_name() if failure.exitcode < 0 else ""
            raised = failure.message if isinstance(failure.message, dict) else {}  # from the worker's error file
            lines = [line for line in str(raised.get("message", "")).splitlines() if line.strip()]
            raise WorkerFailed(rank, failure.exitcode, "" if name == "<N/A>" else name, lines[-1] if lines else "",
                               raised.get("extraInfo", {}).get("py_callstack", "")) from None


def _worker(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker; a worker that raises waits a moment before it ends.

    A rank whose peer is killed fails within milliseconds (its collective finds the socket
    closed), and forked workers end at once; the agent, polling every 0.2 s, would often see
    both ends together and name the lowest rank, not the one that died. Waiting lets it see
    the dead rank first; a rank with an error of its own is still named first, because its
    peers fail only once it has ended.
    """
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        time.sleep(FAILED_WORKER_WAIT_S)
        if isinstance(e, Exception):
            raise
        # DCP's CheckpointException is a BaseException, which torch elastic does not record
        raise RuntimeError(f"{type(e).__name__}: {e}") from e


def _first_failure(e: Any) -> tuple[int, Any]:
    """The failure that came first: killed by a signal before exited with an error (a rank
    killed -9 brings the others down with errors of their own)."""
    failures = sorted(e.failures.items(), key=lambda kv: (kv[1].exitcode >= 0, kv[1].timestamp, kv[0]))
    return failures[0]
