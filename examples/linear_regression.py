"""Data parallel, model averaging and hybrid training of one model, through zhilu's Python API.

    .venv/bin/python examples/linear_regression.py               # 4 processes, all three strategies
    .venv/bin/python examples/linear_regression.py --nproc 2     # hybrid skipped (it needs 2 groups)

Fits y = 2x + noise (mean 0.5) to --points points with nn.Linear(1, 1), three ways:

* data parallel, ``--plan dp=N``: DDP all-reduces the gradients every step;
* model averaging, ``--plan dp=N,avg_every=H``: independent replicas on their own shards of
  each batch average their parameters every H steps (local SGD);
* hybrid, ``--plan dp=N,avg_every=H,avg_groups=N/2``: DDP inside groups of 2 processes, and
  the groups average every H steps.

All three must recover slope 2 and intercept 0.5 (the noise mean) within 0.02, else exit 1.
Model averaging communicates H times less often than DDP. Every strategy uses the same
hyperparameters: mean squared error, AdamW (lr 0.05, no weight decay, cosine-decayed to 0),
1000 points per process and step, --epochs passes over the data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import zhilu
from zhilu.errors import ZhiluError

SLOPE, NOISE_MEAN, NOISE_STD = 2.0, 0.5, 1.0
BATCH, GROUP_SIZE, TOLERANCE = 1000, 2, 0.02


def line(points: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x uniform in [-1, 1], y = 2x + Gaussian noise (mean 0.5, std 1); 1% held out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(points, 1, generator=g) * 2 - 1
    y = SLOPE * x + NOISE_MEAN + NOISE_STD * torch.randn(points, 1, generator=g)
    cut = points - points // 100
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def regression(points: int) -> zhilu.ModelSpec:
    return zhilu.ModelSpec(name="linear", build=partial(nn.Linear, 1, 1), loss=F.mse_loss,
                           dataset=partial(line, points))


def main() -> int:
    parser = argparse.ArgumentParser(description="DDP vs model averaging vs hybrid on linear regression, in zhilu.")
    parser.add_argument("--nproc", type=int, default=4, help="processes (even; hybrid needs >= 4)")
    parser.add_argument("--points", type=int, default=1_000_000, help="data points in all")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data")
    parser.add_argument("--avg-every", type=int, default=8, help="steps between parameter averages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.nproc < 2 or args.nproc % 2:
        print(f"error: --nproc must be an even number >= 2 (hybrid runs groups of {GROUP_SIZE}); "
              f"got {args.nproc}", file=sys.stderr)
        return 2
    n = args.nproc
    plans = {"data parallel": f"dp={n}", "model averaging": f"dp={n},avg_every={args.avg_every}"}
    if n >= 2 * GROUP_SIZE:
        plans["hybrid"] = f"dp={n},avg_every={args.avg_every},avg_groups={n // GROUP_SIZE}"
    spec = regression(args.points)
    steps = max(1, args.epochs * args.points // (BATCH * n))
    settings = {"train.lr": 0.05, "train.min_lr": 0.0, "train.warmup_steps": 0, "train.weight_decay": 0.0,
                "train.log_every": steps, "train.eval_every": 0, "train.eval_batches": 1}
    rows = [f"{'strategy':<16} {'plan':<30} {'wall_s':>7} {'slope':>8} {'intercept':>10} {'slope_err':>10} "
            f"{'icpt_err':>9}"]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, plan in plans.items():
            out = str(Path(tmp) / strategy.replace(" ", "-"))
            try:
                summary = zhilu.train(spec, plan=plan, nproc=n, steps=steps, global_batch=BATCH * n, seed=args.seed,
                                      out=out, settings=settings)
            except ZhiluError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            fit = zhilu.load(spec, out)
            slope, intercept = fit.weight.item(), fit.bias.item()
            errors = abs(slope - SLOPE), abs(intercept - NOISE_MEAN)
            ok &= max(errors) <= TOLERANCE
            rows.append(f"{strategy:<16} {plan:<30} {summary['wall_s']:7.2f} {slope:8.4f} {intercept:10.4f} "
                        f"{errors[0]:10.4f} {errors[1]:9.4f}")
    if "hybrid" not in plans:
        rows.append(f"{'hybrid':<16} skipped: it needs at least 2 groups of {GROUP_SIZE} processes (--nproc 4)")
    print("\n".join(rows))
    verdict = "yes" if ok else "NO"
    print(f"every strategy recovered slope {SLOPE} and intercept {NOISE_MEAN} within {TOLERANCE}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
