"""What rank 0 shows while training: on a terminal a rich progress bar with the step's
breakdown drawn measured beside predicted; otherwise one log line per logged step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from zhilu.monitor.report import COLOURS, ORDER

BAR_WIDTH = 40  # characters for the longer of the measured and predicted step


class _Bar(Progress):
    """rich's progress bar with the breakdown's lines under it."""

    lines: RenderableType = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield self.lines


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool, unit: str = "tok") -> None:
        self.console = Console(highlight=False)
        self.unit = unit
        self.total = total_steps
        self.enabled = enabled
        self._bar: _Bar | None = None
        if enabled and self.console.is_terminal:
            self._bar = _Bar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console)
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
        straggler = f"straggler: rank {record['straggler']}" if record.get("straggler") is not None else ""
        if self._bar is not None:
            self._bar.lines = breakdown_bars(record, straggler)
            self._bar.update(self._task, completed=step, stats=stats)
        else:  # one line per logged step, for logs and pipes: rich must not wrap it
            split = shares(record.get("breakdown", {}), record["step_time_s"])
            self.console.print(f"step {step:>6}/{self.total}  {stats}  {split}  {straggler + '  ' * bool(straggler)}"
                               f"elapsed {clock(record['elapsed_s'])}  ETA {clock(record['eta_s'])}",
                               markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


SHORT = {"data": "data", "forward": "fwd", "backward": "bwd", "recompute": "recomp", "dp_comm_exposed": "dp",
         "pipeline": "pipe", "optimizer": "opt", "other": "other", "compute": "compute", "tp_comm": "tp",
         "pp_comm": "pp", "bubble": "bubble"}


def breakdown_bars(record: dict[str, Any], straggler: str = "") -> Text:
    """Two stacked bars on one scale, measured over predicted, each term in its colour, then the
    step time and each term's share in the bar's order."""
    rows = [("measured", record.get("breakdown") or {}, record["step_time_s"])]
    if record.get("predicted"):
        rows.append(("predicted", record["predicted"], record.get("predicted_step_time_s") or 0.0))
    # one scale for both rows: the longer step (or sum of terms, where a rank's "other" went below zero)
    longest = max(max(total, sum(max(v, 0.0) for v in terms.values())) for _, terms, total in rows) or 1.0
    lines = []
    for label, terms, total in rows:
        line = Text(f"{label:<10}")
        ordered = sorted(terms, key=lambda t: ORDER.index(t) if t in ORDER else len(ORDER))
        drawn, end = 0, 0.0
        for term in ordered:  # cumulative rounding: the segments add up to the bar's length
            end += max(terms[term], 0.0)
            width = round(BAR_WIDTH * end / longest) - drawn
            line.append("█" * width, style=COLOURS.get(term, "white"))
            drawn += width
        labels = [f"{SHORT.get(t, t)} {terms[t] / total:.0%}" for t in ordered if total and terms[t] >= 0.005 * total]
        line.append(" " * (BAR_WIDTH - drawn) + f" {total * 1e3:6.0f} ms  {' '.join(labels)}")  # the bar's order
        lines.append(line)
    if straggler:
        lines.append(Text(straggler, style="bold red"))
    return Text("\n").join(lines)


def shares(breakdown: dict[str, float], step_time: float) -> str:
    """The terms as shares of the step, largest first: ``fwd 41% bwd 38% ...``."""
    parts = sorted(((v / step_time, k) for k, v in breakdown.items() if step_time > 0 and v >= 0.005 * step_time),
                   reverse=True)
    return " ".join(f"{SHORT.get(k, k)} {share:.0%}" for share, k in parts)


def clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
