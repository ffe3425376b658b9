"""Local processes under torch elastic (the engine under torchrun).

``run_local`` starts N processes with the spawn start method, a c10d rendezvous on
127.0.0.1 and restarts after a crash up to ``max_restarts``; under ``torchrun`` this process
is already one of torchrun's ranks (:func:`under_torchrun`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any


class TrainingFailed(Exception):
    """A rank crashed and no restarts were left (exit code 1)."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


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
