"""
    .venv/bin/python examples/linear_regression.py               # 4 processes, all three strategies
    .venv/bin/python examples/linear_regression.py --nproc 2     # hybrid skipped (it needs 2 groups)

Three ways to train one model on several processes, fitting y = 2x + noise to 1,000,000 points.
Data parallel (DDP) all-reduces gradients every step; model averaging (local SGD) trains
independent replicas on their own shards and averages their parameters every --avg-every
steps; hybrid runs DDP inside groups of 2 processes and averages across groups. All three
recover the same line (slope 2, intercept = the noise mean 0.5) to within 0.02 (else exit 1),
while model averaging communicates --avg-every times less often than DDP and so takes less
wall time: for a model this small, each step's all-reduce costs more than its computation.

Every strategy uses the same hyperparameters: nn.Linear(1, 1) with identical initial weights,
mean squared error, plain SGD (lr 0.1, cosine-decayed to 0 so the final fit is not blurred by
gradient noise), mini-batches of 1000 points per process, --epochs passes over each shard.
Rank r generates only its own shard of points // nproc points, from the seed (--seed, r).
--nproc must be even (hybrid runs groups of 2); an odd one is refused with exit code 2.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.parallel import DistributedDataParallel

SLOPE, NOISE_MEAN, NOISE_STD = 2.0, 0.5, 1.0
LR, BATCH, GROUP_SIZE, TOLERANCE = 0.1, 1000, 2, 0.02
STRATEGIES = ("data parallel", "model averaging", "hybrid")


def make_shard(points: int, rank: int, world: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard: x uniform in [-1, 1], y = 2x + Gaussian noise (mean 0.5, std 1)."""
    rng = np.random.default_rng([seed, rank])
    x = rng.uniform(-1.0, 1.0, points // world)
    y = SLOPE * x + rng.normal(NOISE_MEAN, NOISE_STD, x.size)
    xy = torch.from_numpy(np.stack([x, y]).astype(np.float32)).unsqueeze(-1)  # (2, n, 1)
    return xy[0], xy[1]


def train(strategy: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
          groups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None) -> tuple[float, nn.Linear]:
    """Train with one strategy; returns rank 0's training wall time and this rank's model."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    linear = nn.Linear(1, 1)
    model: nn.Module = linear
    averager, average_group = None, None
    if strategy == "data parallel":
        model = DistributedDataParallel(linear)  # all-reduces gradients over every process
    elif strategy == "model averaging":
        average_group = dist.group.WORLD  # no gradient communication at all
    else:
        within, across = groups  # DDP within a group; average with the same position in other groups
        model, average_group = DistributedDataParallel(linear, process_group=within), across
    if average_group is not None:
        averager = PeriodicModelAverager(period=args.avg_every, process_group=average_group)

    steps = args.epochs * (x.shape[0] // BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        i = step % (x.shape[0] // BATCH) * BATCH
        loss = nn.functional.mse_loss(model(x[i:i + BATCH]), y[i:i + BATCH])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if averager is not None:
            averager.average_parameters(model.parameters())
    if average_group is not None:
        average_parameters(model.parameters(), average_group)  # the final merge
    dist.barrier()
    return time.perf_counter() - start, linear


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results: mp.SimpleQueue) -> None:
    """One process: build the process groups, then train with each strategy in turn."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = make_shard(args.points, rank, world, args.seed)
    groups = None
    if world >= 2 * GROUP_SIZE:  # every rank must create every group, in the same order
        within, _ = dist.new_subgroups(group_size=GROUP_SIZE)  # [0, 1], [2, 3], ...
        across, _ = dist.new_subgroups_by_enumeration(  # [0, 2, ...], [1, 3, ...]
            [list(range(i, world, GROUP_SIZE)) for i in range(GROUP_SIZE)])
        groups = (within, across)
    for strategy in STRATEGIES[:3 if groups else 2]:
        seconds, linear = train(strategy, x, y, args, groups)
        if rank == 0:
            results.put((strategy, seconds, linear.weight.item(), linear.bias.item()))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description="DDP vs model averaging vs hybrid on linear regression.")
    parser.add_argument("--nproc", type=int, default=4, help="processes (even; hybrid needs >= 4)")
    parser.add_argument("--points", type=int, default=1_000_000, help="data points in all")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each shard")
    parser.add_argument("--avg-every", type=int, default=8, help="steps between parameter averages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.nproc < 2 or args.nproc % 2:
        print(f"error: --nproc must be an even number >= 2 (hybrid runs groups of {GROUP_SIZE}); "
              f"got {args.nproc}", file=sys.stderr)
        return 2
    if args.points < args.nproc * BATCH or args.epochs < 1 or args.avg_every < 1:
        print(f"error: need --points >= {BATCH} * --nproc, --epochs >= 1 and --avg-every >= 1",
              file=sys.stderr)
        return 2

    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args.nproc, free_port(), args, results), nprocs=args.nproc)
    print(f"{'strategy':<16} {'time_s':>7} {'slope':>8} {'intercept':>10} {'slope_err':>10} {'icpt_err':>9}")
    ok = True
    while not results.empty():
        strategy, seconds, slope, intercept = results.get()
        errors = abs(slope - SLOPE), abs(intercept - NOISE_MEAN)
        ok &= max(errors) <= TOLERANCE
        print(f"{strategy:<16} {seconds:7.2f} {slope:8.4f} {intercept:10.4f} "
              f"{errors[0]:10.4f} {errors[1]:9.4f}")
    if args.nproc < 2 * GROUP_SIZE:
        print(f"{'hybrid':<16} skipped: it needs at least 2 groups of {GROUP_SIZE} processes (--nproc 4)")
    verdict = "yes" if ok else "NO"
    print(f"every strategy recovered slope {SLOPE} and intercept {NOISE_MEAN} within {TOLERANCE}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
