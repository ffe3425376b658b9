"""Processes that map work in order (none for one worker), and a progress bar for the terminal."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any


def _call(args: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, a = args
    return fn(*a)


def _worker_init(threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the tokenizers library's threads in this worker


class Pool:
    """``workers`` spawned processes (none for one worker) mapping in order."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def __enter__(self) -> Pool:
        if self.workers > 1:
            threads = max(1, len(os.sched_getaffinity(0)) // self.workers)
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, _worker_init, (threads,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] else self._pool.close()
            self._pool.join()

    def map(self, fn: Callable[..., Any], items: list[Any], *shared: Any) -> Iterator[Any]:
        return self.map_each(fn, [(item,) for item in items], *shared)

    def map_each(self, fn: Callable[..., Any], items: list[tuple[Any, ...]], *shared: Any) -> Iterator[Any]:
        calls = [(fn, (*item, *shared)) for item in items]
        if self._pool is None:
            return (_call(c) for c in calls)
        return self._pool.imap(_call, calls)


class bar:
    """A progress bar with throughput and time left on a terminal; nothing otherwise."""

    def __init__(self, what: str, total: int | None, unit: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(stderr=True)
        self._progress = Progress(TextColumn(f"zhilu data: {what}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                                  disable=not console.is_terminal, transient=True)
        self._task = self._progress.add_task(what, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self._progress.start()
        return lambda n: self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
