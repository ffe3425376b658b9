"""``zhilu plan``: predict step time and memory of training plans, and pick the fastest that fits.

    zhilu plan --model llama3-8b --seq-len 8192 --global-batch 512 --gpus 64 --hardware h100-sxm
    zhilu plan --layers 128 --hidden 25600 --heads 160 --vocab 51200 --seq-len 2048 \\
               --global-batch 1536 --gpus 3072 --hardware a100-80gb --top 3 --json

Degrees and choices given (``--tp 8 --pp 4 ...``) are kept; the rest is searched.
``--software NAME`` predicts for another training stack than zhilu's own
(:data:`zhilu.perf.software.STACKS`). ``--json`` prints ``{"plans": [...], "best": 0,
"software": NAME}`` (DESIGN.md section 3), each plan with its ``error_band``
(:mod:`zhilu.perf.confidence`, null where no published runs are of its kind); with ``--tokens`` each plan also
has ``time_to_train_s``, ``device_hours`` and ``energy_kwh`` (devices only). No torch here: the
answer comes from the analytic model in :mod:`zhilu.perf` (docs/perf_model.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from typing import Any

from zhilu.errors import ZhiluError
from zhilu.models.presets import PRESETS, GPTConfig, preset
from zhilu.perf.confidence import Band, band
from zhilu.perf.device import Cluster
from zhilu.perf.flops import Transformer
from zhilu.perf.hardware_file import cluster
from zhilu.perf.search import search
from zhilu.perf.software import STACKS, stack
from zhilu.perf.step import Estimate
from zhilu.plan import PRECISIONS, RECOMPUTE, SCHEDULES

WIDTH = 100  # columns of the table when the output is not a terminal (a file, a pipe)
SHORT = {"compute": "compute", "recompute": "recompute", "tp_comm": "tp", "pp_comm": "pp", "dp_comm_exposed": "dp",
         "bubble": "bubble", "optimizer": "optimizer", "other": "other"}
# flags that pin the plan: their destinations, and the search field each pins (zhilu.plan.Plan's,
# and micro_batch: sequences per micro-batch)
PINNED = {"dp": "dp", "tp": "tp", "pp": "pp", "zero": "zero", "micro_batch": "micro_batch", "schedule": "schedule",
          "virtual_stages": "vstages", "recompute": "recompute", "precision": "precision"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``zhilu plan`` (DESIGN.md section 3)."""
    model = parser.add_argument_group("model (a preset, or its shape)")
    model.add_argument("--model", metavar="PRESET", help=f"model preset: {', '.join(PRESETS)}")
    model.add_argument("--layers", type=int, help="transformer layers")
    model.add_argument("--hidden", type=int, help="hidden size")
    model.add_argument("--heads", type=int, help="attention heads")
    model.add_argument("--kv-heads", type=int, help="key/value heads (default: as many as --heads)")
    model.add_argument("--ffn", type=int, help="SwiGLU inner size (default: 8/3 hidden rounded up to 256)")
    model.add_argument("--vocab", type=int, help="vocabulary size")
    job = parser.add_argument_group("job and hardware")
    job.add_argument("--seq-len", type=int, help="tokens per sequence")
    job.add_argument("--global-batch", type=int, help="sequences per step over all replicas")
    job.add_argument("--gpus", type=int, help="devices in all")
    job.add_argument("--gpus-per-node", type=int, help="devices per node (default: the hardware's)")
    job.add_argument("--hardware", metavar="NAME|FILE",
                     help="a100-40gb, a100-80gb, h100-sxm, h200, v100-32gb, cpu, or a hardware .toml file")
    job.add_argument("--software", metavar="NAME", default="zhilu",
                     help=f"the training software the prediction is for: {', '.join(STACKS)} (default: zhilu)")
    plan = parser.add_argument_group("plan (given: kept; left out: searched)")
    plan.add_argument("--dp", type=int, help="data-parallel degree")
    plan.add_argument("--tp", type=int, help="tensor-parallel degree (within a node)")
    plan.add_argument("--pp", type=int, help="pipeline-parallel degree")
    plan.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (0 = DDP)")
    plan.add_argument("--micro-batch", type=int, help="sequences per micro-batch")
    plan.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule")
    plan.add_argument("--virtual-stages", type=int, help="chunks per device of the interleaved schedule")
    plan.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation")
    plan.add_argument("--precision", choices=PRECISIONS,
                      help="bf16 (mixed: fp32 master weights and Adam) or fp32 (default: bf16 where the hardware "
                           "multiplies bf16 faster than fp32, as GPUs do; else fp32)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, default=5, metavar="K", help="show the K fastest plans (default: 5)")
    out.add_argument("--json", action="store_true", help='print {"plans": [...], "best": 0}')
    out.add_argument("--tokens", type=float, metavar="N",
                     help="also give the time, device-hours and energy to train N tokens")


def run(args: argparse.Namespace) -> int:
    """Evaluate or search plans and print them; bad input raises :class:`ZhiluError`."""
    config = _config(args)
    seq_len = _positive(args, "seq_len", "seq-len")
    global_batch = _positive(args, "global_batch", "global-batch")
    gpus = _positive(args, "gpus", "gpus")
    top = _positive(args, "top", "top")
    if args.hardware is None:
        raise ZhiluError("hardware", "required: a preset (a100-40gb, a100-80gb, h100-sxm, h200, v100-32gb, cpu) "
                                     "or a hardware .toml file")
    if args.gpus_per_node is not None:
        _positive(args, "gpus_per_node", "gpus-per-node")
    if args.tokens is not None and not (args.tokens > 0 and math.isfinite(args.tokens)):
        raise ZhiluError("tokens", f"must be a positive number, got {args.tokens}")
    software = stack(args.software)
    hw = cluster(args.hardware, gpus, args.gpus_per_node)
    for name in ("dp", "tp", "pp", "micro_batch", "virtual_stages"):
        if getattr(args, name) is not None:
            _positive(args, name, name.replace("_", "-"))
    fixed = {key: getattr(args, dest) for dest, key in PINNED.items() if getattr(args, dest) is not None}
    if fixed.get("vstages", 1) > 1:
        fixed.setdefault("schedule", "interleaved")
    model = Transformer(config, seq_len)
    estimates = _distinct(search(model, hw, global_batch, fixed=fixed, software=software), top)
    # the published runs are all on accelerators: they say nothing of a CPU's
    bands = [None if hw.device.synchronous else band(e.plan, e.step_time_s, software.name) for e in estimates]
    if args.json:
        print(json.dumps(_json(estimates, bands, args.tokens, hw.device.power_w, software.name), indent=1))
    else:
        _table(estimates, bands, model, hw, global_batch, args.tokens, software.name)
    return 0


def _config(args: argparse.Namespace) -> GPTConfig:
    shape = {"n_layers": args.layers, "hidden": args.hidden, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
             "ffn_hidden": args.ffn, "vocab_size": args.vocab}
    given = {k: v for k, v in shape.items() if v is not None}
    for key, value in given.items():
        if value < 1:
            raise ZhiluError(f"model.{key}", f"must be a positive integer, got {value}")
    if args.model is not None:
        cfg = preset(args.model, **given)
    else:
        missing = [flag for flag, key in (("--layers", "n_layers"), ("--hidden", "hidden"), ("--heads", "n_heads"),
                                          ("--vocab", "vocab_size")) if key not in given]
        if missing:
            raise ZhiluError("model", f"give --model PRESET ({', '.join(PRESETS)}) or the shape; missing "
                                      f"{', '.join(missing)}")
        given.setdefault("ffn_hidden", 256 * math.ceil(8 * given["hidden"] / 3 / 256))
        cfg = GPTConfig(**given)
        cfg.validate()
    if args.seq_len is not None and args.seq_len > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=args.seq_len)
    return cfg


def _positive(args: argparse.Namespace, dest: str, flag: str) -> int:
    value = getattr(args, dest)
    if value is None:
        raise ZhiluError(dest, f"required: --{flag} N")
    if value < 1:
        raise ZhiluError(dest, f"must be a positive integer, got {value}")
    return value


def _distinct(estimates: list[Estimate], top: int) -> list[Estimate]:
    """The ``top`` fastest plans that differ in the fields ``--json`` reports (the fastest of each)."""
    seen: set[tuple] = set()
    out: list[Estimate] = []
    for e in estimates:
        p = e.plan
        key = (p.dp, p.tp, p.pp, p.zero, p.sp, e.micro_batch, p.schedule, p.vstages, p.recompute, p.precision)
        if key not in seen:
            seen.add(key)
            out.append(e)
            if len(out) == top:
                break
    return out


def _training(e: Estimate, tokens: float, devices: int, power_w: float) -> dict[str, float]:
    seconds = tokens / e.tokens_per_s
    hours = seconds / 3600 * devices
    return {"time_to_train_s": seconds, "device_hours": hours, "energy_kwh": hours * power_w / 1000}


def _json(estimates: list[Estimate], bands: list[Band | None], tokens: float | None, power_w: float,
          software: str) -> dict[str, Any]:
    plans = []
    for e, b in zip(estimates, bands):
        entry = {**e.as_dict(), "error_band": b.as_dict() if b else None}
        if tokens is not None:
            entry.update(_training(e, tokens, e.plan.dp * e.plan.tp * e.plan.pp, power_w))
        plans.append(entry)
    return {"plans": plans, "best": 0 if estimates and estimates[0].fits else None, "software": software}


def _table(estimates: list[Estimate], bands: list[Band | None], model: Transformer, hw: Cluster, global_batch: int,
           tokens: float | None, software: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cfg = model.config
    n = cfg.num_params()
    size = f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    title = (f"{size} parameters, {model.layers} layers, seq {model.seq_len}, "
             f"batch {global_batch} x {model.seq_len} tokens on {hw.devices} x {hw.device.name} "
             f"({hw.nodes} node{'s' * (hw.nodes > 1)} of {hw.devices_per_node}), software {software}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    precisions = sorted({e.plan.precision for e in estimates})
    if len(precisions) == 1:
        table.title += f", {precisions[0]}"
    for name in ("#", "dp.tp.pp", "zero", "b x mb", "schedule", "recompute", "prec", "step s", "MFU", "GiB/dev",
                 "time goes to"):
        if name == "prec" and len(precisions) == 1:
            continue
        table.add_column(name, justify="left" if name in ("schedule", "recompute", "prec", "time goes to") else "right",
                         no_wrap=name != "time goes to")
    for i, e in enumerate(estimates):
        p = e.plan
        schedule = "-" if p.pp == 1 else p.schedule + (f" x{p.stages_per_rank}" if p.stages_per_rank > 1 else "")
        parts = sorted(((v / e.step_time_s, k) for k, v in e.breakdown.items() if v >= 0.01 * e.step_time_s),
                       reverse=True)
        table.add_row(str(i + 1), f"{p.dp}.{p.tp}{'+sp' if p.sp else ''}.{p.pp}", str(p.zero),
                      f"{e.micro_batch} x {p.mb}", schedule, p.recompute,
                      *([p.precision] if len(precisions) > 1 else []), f"{e.step_time_s:.3g}", f"{e.mfu:.1%}",
                      f"{e.memory_gib_per_device:.1f}" + ("" if e.fits else " !"),
                      " ".join(f"{SHORT[k]} {share:.0%}" for share, k in parts[:2]))
    console = Console(width=None if sys.stdout.isatty() else WIDTH)
    console.print(table)
    peaks = sorted({(e.plan.precision, e.peak_tflops) for e in estimates})
    console.print("b x mb: sequences per micro-batch x micro-batches per replica; step s: seconds per optimizer step; "
                  "MFU: model FLOP/s over the peak of "
                  + ", ".join(f"{peak:g} TFLOP/s {precision}" for precision, peak in peaks) + f" per {hw.device.name}; "
                  "GiB/dev: memory per device (weights, gradients, optimizer state, activations, buffers), "
                  "! = does not fit; time goes to: share of the step (tp/pp: exposed tensor/pipeline-parallel "
                  "traffic; dp: exposed data-parallel traffic)")
    console.print("zhilu train --plan SPEC for each row, with the range 80% of published runs of its kind fell in:")
    for i, (e, b) in enumerate(zip(estimates, bands)):
        trust = (f"({b.low_s:.3g}-{b.high_s:.3g} s: {b.rows} published runs, {b.regime})" if b
                 else "(no published runs of its kind)")
        console.print(f"  {i + 1}  {e.plan.spec()}  {trust}", soft_wrap=True)
    if tokens is not None and estimates:
        t = _training(estimates[0], tokens, hw.devices, hw.device.power_w)
        console.print(f"Plan 1 trains {tokens:.3g} tokens in {t['time_to_train_s'] / 86400:.2f} days: "
                      f"{t['device_hours']:,.0f} device-hours, {t['energy_kwh'] / 1000:,.1f} MWh "
                      f"(devices at {hw.device.power_w:g} W, hosts and cooling not included)")

