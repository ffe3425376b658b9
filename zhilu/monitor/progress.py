"""What rank 0 shows while training: a rich progress bar on a terminal, log lines otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool, unit: str = "tok") -> None:
        self.console = Console(highlight=False)
        self.unit = unit
        self.total = total_steps
        self.enabled = enabled
        self._bar: Progress | None = None
        if enabled and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, stats="")
            self._bar.start()

    def print(self, *objects: Any, markup: bool = True) -> None:
        if self.enabled:
            self.console.print(*objects, markup=markup)

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` (cheap: rich redraws at most a few times a second)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Show a logged step (``record`` is the metrics.jsonl line)."""
        if not self.enabled:
            return
        mfu = f"MFU {100 * record['mfu']:.1f}%  " if record["mfu"] is not None else ""
        stats = (f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} {self.unit}/s  "
                 f"{mfu}{record['step_time_s'] * 1e3:.0f} ms/step")
        if "predicted_step_time_s" in record:
            stats += f" (predicted {record['predicted_step_time_s'] * 1e3:.0f})"
        if "val_loss" in record:
            stats += f"  val {record['val_loss']:.4f}"
        split = shares(record.get("breakdown", {}), record["step_time_s"])
        if record.get("straggler") is not None:
            split += f"  straggler: rank {record['straggler']}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=f"{stats}  {split}")
        else:  # one line per logged step, for logs and pipes: rich must not wrap it
            self.console.print(f"step {step:>6}/{self.total}  {stats}  {split}  elapsed "
                               f"{clock(record['elapsed_s'])}  ETA {clock(record['eta_s'])}",
                               markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


SHORT = {"data": "data", "forward": "fwd", "backward": "bwd", "dp_comm_exposed": "dp", "pipeline": "pipe",
         "optimizer": "opt", "other": "other"}


def shares(breakdown: dict[str, float], step_time: float) -> str:
    """The measured terms as shares of the step, largest first: ``fwd 41% bwd 38% ...``."""
    parts = sorted(((v / step_time, k) for k, v in breakdown.items() if step_time > 0 and v >= 0.005 * step_time),
                   reverse=True)
    return " ".join(f"{SHORT[k]} {share:.0%}" for share, k in parts)


def clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
