"""report.html: one self-contained page of plots (plotly, its JavaScript inlined) for a
training run, or for ``zhilu bench``'s strategies (:func:`write_bench_report`).

    zhilu report RUN_DIR [--out FILE]        # default RUN_DIR/report.html; opens with no network

From the run's metrics.jsonl and summary.json: loss (train and validation), step time
measured beside predicted, the breakdown of a step measured beside predicted, memory per rank
measured beside predicted, and one step per rank laid out as a timeline of its measured terms
(the mean step of the last logged interval, terms in the order a step runs them).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from zhilu.durable import write_atomic
from zhilu.errors import ZhiluError

# The measured terms and the predicted ones, in the order a step runs them.
ORDER = ("data", "forward", "backward", "compute", "recompute", "tp_comm", "pp_comm", "dp_comm_exposed", "pipeline",
         "bubble", "optimizer", "other")
MEMORY = ("params", "grads", "optimizer", "peak")
# One colour per concept, measured (solid) and predicted (hatched) alike; the model's ``compute``
# is the measured forward and backward together, its ``bubble`` part of the measured ``pipeline``.
COLOURS = {"data": "#7f7f7f", "forward": "#2ca02c", "backward": "#98df8a", "compute": "#2ca02c",
           "recompute": "#bcbd22", "dp_comm_exposed": "#1f77b4", "tp_comm": "#17becf", "pp_comm": "#9edae5",
           "pipeline": "#ff7f0e", "bubble": "#ff7f0e", "optimizer": "#9467bd", "other": "#d62728"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a zhilu train run directory")
    parser.add_argument("--out", default="", help="the HTML file to write (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    out = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {out}")
    return 0


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's report (atomically) and return its path."""
    records, summary = _read_run(run_dir)
    go, get_plotlyjs = plotly()
    figures = [_loss(go, records), _step_time(go, records), _breakdown(go, records, summary),
               _memory(go, summary), _timeline(go, records)]
    title = f"zhilu run {run_dir.name}: {summary.get('model', '?')}, plan {_plan(summary.get('plan'))}"
    facts = (f"{summary.get('world_size', '?')} x {summary.get('device', '?')}, {summary.get('last_step', '?')} "
             f"steps, ended: {summary.get('ended', '?')}")
    return _write_page(out or run_dir / "report.html", title, facts, figures, get_plotlyjs())


def write_bench_report(out_dir: Path, table: list[dict[str, Any]]) -> Path:
    """``zhilu bench``'s report.html: each strategy's step time, breakdown, memory and loss."""
    go, get_plotlyjs = plotly()

    ran = [r for r in table if "failed" not in r]
    names = [r["strategy"] for r in ran]
    times = go.Figure()
    spread = {"type": "data", "symmetric": False, "array": [(r["p90_s"] - r["median_s"]) * 1e3 for r in ran],
              "arrayminus": [(r["median_s"] - r["p10_s"]) * 1e3 for r in ran]}
    times.add_bar(x=names, y=[r["median_s"] * 1e3 for r in ran], name="measured (median)", error_y=spread)
    times.add_bar(x=names, y=[(r.get("predicted_s") or 0) * 1e3 for r in ran], name="predicted")
    times.update_layout(barmode="group")
    split = go.Figure()
    for t in ORDER:
        if any(r["breakdown"].get(t) for r in ran):
            _term(split, t, False, x=names, y=[r["breakdown"].get(t, 0.0) * 1e3 for r in ran], offsetgroup="m")
    for t in sorted({t for r in ran for t, v in r["predicted"].items() if v}):
        _term(split, t, True, x=names, y=[r["predicted"].get(t, 0.0) * 1e3 for r in ran], offsetgroup="p")
    split.update_layout(barmode="stack")
    memory = go.Figure()
    width = max((len(r["memory_mib_per_rank"]) for r in ran), default=0)
    for rank in range(width):
        memory.add_bar(x=names, y=[r["memory_mib_per_rank"][rank]["peak"] if rank < len(r["memory_mib_per_rank"])
                                   else None for r in ran], name=f"rank {rank}")
    memory.update_layout(barmode="group")
    loss = go.Figure()
    for r in ran:
        loss.add_scatter(x=[s for s, _ in r["losses"]], y=[v for _, v in r["losses"]], name=r["strategy"], mode="lines")
    figures = [_layout(times, "Step time by strategy (bars: 10th-90th percentile)", "", "ms per step"),
               _layout(split, "Where a step's time goes, measured (left) and predicted (right)", "", "ms per step"),
               _layout(memory, "Peak memory per rank", "", "MiB"),
               _layout(loss, "Training loss by strategy", "step", "loss (nats per token)")]
    failed = "; ".join(f"{r['strategy']}: {r['failed']}" for r in table if "failed" in r)
    facts = f"{len(ran)} strategies ran" + (f"; could not run: {failed}" if failed else "")
    return _write_page(out_dir / "report.html", f"zhilu bench {out_dir.name}", facts, figures, get_plotlyjs())


def plotly() -> tuple[Any, Any]:
    """plotly's graph objects and its JavaScript, or a clear error when it is not installed."""
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ZhiluError("report", "needs the plotly package: pip install 'zhilu[report]'") from None
    return go, get_plotlyjs


def _write_page(out: Path, title: str, facts: str, figures: list[Any], plotly_js: str) -> Path:
    body = "\n".join(f.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
                     for f in figures if f is not None)
    page = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{_escape(title)}</title>\n"
            f"<script>{plotly_js}</script>\n"
            "<style>body{font-family:sans-serif;margin:1.5em auto;max-width:1000px}</style></head>\n"
            f"<body><h1>{_escape(title)}</h1><p>{_escape(facts)}</p>\n{body}\n</body></html>\n")
    if out.is_dir() or not out.parent.is_dir():
        where = f"{out} is a directory" if out.is_dir() else f"{out.parent} is not a directory"
        raise ZhiluError("--out", f"{where}; give the path of an HTML file to write")
    try:
        write_atomic(out, page)
    except OSError as e:
        raise ZhiluError("--out", f"cannot write {out} ({e.strerror})") from None
    return out


def _read_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ZhiluError("RUN_DIR", f"{run_dir} holds no metrics.jsonl; give a directory `zhilu train` wrote")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            break
    if not records:
        raise ZhiluError("RUN_DIR", f"{metrics} has no logged step yet")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return records, summary


def _layout(fig: Any, title: str, x: str, y: str) -> Any:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=380, legend_title_text="",
                      margin={"t": 60, "b": 50})
    return fig


def _loss(go: Any, records: list[dict[str, Any]]) -> Any:
    fig = go.Figure()
    fig.add_scatter(x=[r["step"] for r in records], y=[r["loss"] for r in records], name="train", mode="lines")
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        fig.add_scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], name="validation",
                        mode="lines+markers")
    return _layout(fig, "Loss", "step", "loss (nats per token)")


def _step_time(go: Any, records: list[dict[str, Any]]) -> Any:
    fig = go.Figure()
    steps = [r["step"] for r in records]
    fig.add_scatter(x=steps, y=[r["step_time_s"] * 1e3 for r in records], name="measured", mode="lines+markers")
    if any("predicted_step_time_s" in r for r in records):
        fig.add_scatter(x=steps, y=[r.get("predicted_step_time_s", 0) * 1e3 for r in records], name="predicted",
                        mode="lines", line={"dash": "dash"})
    return _layout(fig, "Step time, measured and predicted", "step", "ms per step")


def _breakdown(go: Any, records: list[dict[str, Any]], summary: dict[str, Any]) -> Any:
    """Stacked bars: the median measured terms over the logged steps after the first, and the prediction."""
    logged = [r for r in records if "breakdown" in r]
    if not logged:
        return None
    logged = logged[1:] or logged
    terms = [t for t in ORDER if any(t in r["breakdown"] for r in logged)]
    measured = {t: statistics.median(r["breakdown"].get(t, 0.0) for r in logged) for t in terms}
    predicted = logged[-1].get("predicted") or summary.get("predicted_breakdown") or {}
    fig = go.Figure()
    for t, v in measured.items():
        _term(fig, t, False, x=["measured"], y=[v * 1e3])
    for t, v in predicted.items():
        if v:
            _term(fig, t, True, x=["predicted"], y=[v * 1e3])
    fig.update_layout(barmode="stack")
    return _layout(fig, "Where a step's time goes (median of the logged steps)", "", "ms per step")


def _memory(go: Any, summary: dict[str, Any]) -> Any:
    measured = summary.get("memory_mib_per_rank")
    if not measured:
        return None
    ranks = [f"rank {r}" for r in range(len(measured))]
    fig = go.Figure()
    for kind in MEMORY:
        fig.add_bar(x=ranks, y=[m.get(kind, 0.0) for m in measured], name=f"measured: {kind}")
    predicted = summary.get("predicted_memory_mib_per_rank")
    if predicted:
        fig.add_scatter(x=ranks, y=[predicted] * len(ranks) if isinstance(predicted, (int, float)) else predicted,
                        name="predicted: model states and activations", mode="markers",
                        marker={"symbol": "diamond", "size": 12})
    fig.update_layout(barmode="group")
    return _layout(fig, "Memory per rank after the first step", "", "MiB")


def _timeline(go: Any, records: list[dict[str, Any]]) -> Any:
    last = next((r for r in reversed(records) if r.get("breakdown_by_rank")), None)
    if last is None:
        return None
    fig = go.Figure()
    rows = last["breakdown_by_rank"]
    names = [f"rank {r}" for r in range(len(rows))]
    for t in ORDER:
        if any(row.get(t) for row in rows):
            fig.add_bar(y=names, x=[row.get(t, 0.0) * 1e3 for row in rows], name=t, orientation="h",
                        marker_color=COLOURS.get(t))
    fig.update_layout(barmode="stack", yaxis={"autorange": "reversed"})
    return _layout(fig, f"One step per rank (mean of steps up to {last['step']})", "ms from the step's start", "")


def _term(fig: Any, term: str, predicted: bool, **bar: Any) -> None:
    """One term's stacked bar: its concept's colour, hatched when it is the prediction."""
    fig.add_bar(name=f"{'predicted' if predicted else 'measured'}: {term}", marker_color=COLOURS.get(term),
                marker_pattern_shape="/" if predicted else "", **bar)


def _plan(plan: Any) -> str:
    from zhilu.plan import Plan

    try:
        return Plan(**plan).describe()
    except TypeError:  # no summary yet, or one from another version
        return "?"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
