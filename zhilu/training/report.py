"""What rank 0 prints about a run: memory after the first step, and the summary at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zhilu.monitor.correction import STEPS
from zhilu.monitor.memory import KEYS
from zhilu.monitor.progress import TrainProgress
from zhilu.perf.step import Estimate
from zhilu.plan import Plan


def print_memory(progress: TrainProgress, rows: list[dict[str, float]], device_type: str,
                 prediction: Estimate | None) -> None:
    progress.print("memory per rank after step 1 (MiB): params / grads / optimizer / peak " +
                   ("RSS" if device_type == "cpu" else "allocated"))
    for rank, row in enumerate(rows):
        progress.print(f"  rank {rank}: " + " / ".join(f"{row[k]:,.1f}" for k in KEYS))
    if prediction is not None:
        m = prediction.memory
        progress.print(f"  predicted (most loaded rank): {m.weights / 2**20:,.1f} / {m.gradients / 2**20:,.1f} / "
                       f"{m.optimizer / 2**20:,.1f} / {m.total / 2**20:,.1f} of states, activations and buffers")


def print_summary(progress: TrainProgress, s: dict[str, Any], run_dir: Path) -> None:
    plan = Plan(**s["plan"]).describe()
    unit = "tokens" if s["seq_len"] else "samples"
    mfu = (f", MFU {100 * s['mfu']:.1f}% of the {s['peak_tflops']:g} TFLOP/s peak of {s['hardware']}"
           if s["mfu"] is not None else "")
    if s.get("hfu") and s["hfu"] != s["mfu"]:
        mfu += f" (HFU {100 * s['hfu']:.1f}%, recomputation counted)"
    lines = [f"[bold]plan[/]        {plan} on {s['world_size']} x {s['device']}"]
    if s["measured_step_time_s"] is not None:
        lines.append(f"[bold]throughput[/]  {s['tokens_per_s']:,.0f} {unit}/s, "
                     f"{s['measured_step_time_s'] * 1e3:.0f} ms/step{mfu}")
    if s["prediction_error"] is not None:
        lines.append(f"[bold]predicted[/]   {s['predicted_step_time_s'] * 1e3:.0f} ms/step, measured "
                     f"{s['measured_step_time_s'] * 1e3:.0f} ({s['prediction_error']:+.0%})")
    if s.get("corrected_error") is not None:
        after = s["corrected_step_time_s"] * (1 + s["corrected_error"])
        lines.append(f"[bold]corrected[/]   {s['corrected_step_time_s'] * 1e3:.0f} ms/step from the first {STEPS} "
                     f"steps; after them {after * 1e3:.0f} ({s['corrected_error']:+.0%})")
    if s["final_loss"] is not None:
        val = f", validation {s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else ""
        lines.append(f"[bold]loss[/]        train {s['final_loss']:.4f}{val}")
    if s["explain"] is not None:
        x = s["explain"]
        line = f"[bold]time goes to[/] {x['meaning']} ({x['share']:.0%} of the predicted step)"
        if x["switch_to"]:
            w = x["switch_to"]
            line += f"; --plan {w['plan']} is predicted {w['predicted_speedup']:.2f}x faster"
        lines.append(line)
    lines.append(f"[bold]run[/]         {run_dir}")
    for line in lines:
        progress.print(line)
    if s["sample"] is not None:
        progress.print("[bold]sample[/]")
        progress.print(s["sample"], markup=False)
