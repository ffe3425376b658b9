"""Tensor-parallel traffic, timed where this rank spends it.

DTensor, which tensor parallelism runs on, issues its collectives as functional collectives
(``torch.ops._c10d_functional``): a launch that returns once the collective is queued, and a
``wait_tensor`` where the result is needed, which blocks until it is done (the first operator
on an ``AsyncCollectiveTensor`` waits so). While the step clock runs a forward or a backward,
:class:`TensorParallelTraffic` (a dispatch mode) times the launches of the tensor-parallel
group's collectives and the waits for their results; that time
is the tensor-parallel traffic nothing hid (``tp_comm``), including the wait for a slower peer.
Other collectives (FSDP's gathers, DDP's all-reduces, pipeline transfers) pass untimed.

On CPU only: a wait on a GPU blocks a stream, not the host, so host clocks cannot see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.utils._python_dispatch import TorchDispatchMode

WAIT = torch.ops._c10d_functional.wait_tensor.default


class TensorParallelTraffic(TorchDispatchMode):
    """Seconds this rank spent in the collectives of the group named ``group_name``.

    ``before_launch``: called as each of them is launched, inside the timed span (a fault that
    slows the collective)."""

    def __init__(self, group_name: str, before_launch: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.group_name = group_name
        self.before_launch = before_launch
        self.seconds = 0.0
        self._pending: set[int] = set()  # data pointers of results launched and not yet waited for

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace != "_c10d_functional":
            for a in (*args, *kwargs.values()):  # an operator on a result not yet waited for waits for it first
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    if isinstance(t, AsyncCollectiveTensor) and not t.completed:
                        self._wait(t.elem, t.trigger_wait)
            return func(*args, **kwargs)
        if func is WAIT:
            return self._wait(args[0], lambda: func(*args, **kwargs))
        if not any(isinstance(a, str) and a == self.group_name for a in (*args, *kwargs.values())):
            return func(*args, **kwargs)  # another group's, or not a collective (a wrapper op)
        start = time.perf_counter()
        if self.before_launch is not None:
            self.before_launch()
        out = func(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor):
                self._pending.add(t.data_ptr())
        return out

    def _wait(self, result: torch.Tensor, wait: Callable[[], Any]) -> Any:
        """``wait()`` for ``result``, timed if it is the result of one of the group's collectives."""
        if result.data_ptr() not in self._pending:
            return wait()
        self._pending.discard(result.data_ptr())
        start = time.perf_counter()
        out = wait()
        self.seconds += time.perf_counter() - start
        return out
