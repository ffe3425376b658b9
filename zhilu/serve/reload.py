"""``zhilu serve --reload``: follow a run that is still training, moving to each newer checkpoint.

A thread polls ``checkpoints/latest`` (moved only once a checkpoint is complete). A newer
checkpoint is verified and loaded beside the model being served, then becomes the model
new requests start on; requests already running finish on the weights they started with.
A checkpoint that fails verification is named once and skipped; serving goes on.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from zhilu.errors import ZhiluError
from zhilu.serve.engine import Engine
from zhilu.serve.loading import load_run


class Reloader:
    def __init__(self, run_dir: Path, engine: Engine, device: str, interval: float = 1.0,
                 on_swap: Callable[[int], None] | None = None) -> None:
        self.run_dir, self.engine, self.device, self.interval, self.on_swap = run_dir, engine, device, interval, on_swap
        self._skipped: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zhilu-reload", daemon=True)
        self._thread.start()

    def check(self) -> int | None:
        """Load a checkpoint newer than the one served, if there is one; the step now served for new requests."""
        from zhilu.training.checkpoint_files import latest_checkpoint

        path = latest_checkpoint(self.run_dir)
        if path is None or path.name in self._skipped:
            return None
        if int(path.name.removeprefix("step-")) <= self.engine.version.step:
            return None
        try:
            run = load_run(self.run_dir, self.device, checkpoint=path)  # verified against its manifest
        except (ZhiluError, OSError) as e:
            self._skipped.add(path.name)
            print(f"zhilu serve: not moving to {path.name}: {e}", file=sys.stderr, flush=True)
            return None
        self.engine.swap(run.model, run.step)
        print(f"zhilu serve: serving step {run.step} ({path.name}) to new requests", file=sys.stderr, flush=True)
        if self.on_swap is not None:
            self.on_swap(run.step)
        return run.step

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as e:  # a reload must never take the server down
                print(f"zhilu serve: reload failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
