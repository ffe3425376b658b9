"""zhilu's DDP training step, with its step breakdown measured, against a hand-written
PyTorch DDP loop, side by side.

    python benchmarks/overhead.py [--nproc 2] [--rounds 12] [--steps-per-round 5]
    python benchmarks/overhead.py --tp-comm     # the cost of --metrics.tp_comm under tp=2

Both loops train the same model (gpt-tiny, 16 x 256 tokens per step over 2 gloo ranks)
on the same batches, with AdamW, gradient clipping and a per-step learning rate. They
alternate in rounds within one run, so machine noise hits both alike; the first two rounds
warm up and are dropped. Prints the median step time of each and their ratio (zhilu / plain;
the target is at most 1.03). zhilu's step runs as in training: its step clock times every term
(zhilu/monitor/breakdown.py), DDP's comm hook marks each bucket's launch, and every 10 steps
the ranks gather their breakdowns, so the ratio includes what the instrumentation costs
(target: at most 2%).

With ``--tp-comm`` the two sides are zhilu's tensor-parallel step (tp=NPROC) with its
tensor-parallel traffic timed apart (``--metrics.tp_comm``, a dispatch mode that sees every
operator) and the same step without it; the ratio is what that timing costs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from zhilu.config import JobConfig
from zhilu.launch.prepare import prepare
from zhilu.models.gpt import build_model
from zhilu.parallel.mesh import init_parallel, shutdown_parallel
from zhilu.spec import token_cross_entropy as loss_fn
from zhilu.training.optim import lr_at
from zhilu.training.trainer import Trainer

warnings.filterwarnings("ignore", category=FutureWarning)  # DDP(broadcast_buffers=...) in the plain loop


def plain_ddp_loop(cfg: JobConfig, model_cfg, loader):
    """What a user writes by hand: DDP (no buffer broadcast, as zhilu), AdamW, clip, step."""
    model = DistributedDataParallel(build_model(model_cfg, seed=cfg.train.seed), broadcast_buffers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0

    def train_step() -> None:
        nonlocal step
        x, y = loader.next_batch()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

    return train_step


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg, plan, spec = args.job
    model_cfg = spec.shape
    env = init_parallel(plan, "cpu")

    def zhilu_loop(cfg: JobConfig):
        trainer = Trainer(cfg, plan, spec, env)

        def zhilu_step() -> None:
            trainer.clock.start_step()
            trainer.train_step(*trainer.next_batch())
            trainer.clock.end_step()
            if trainer.step % 10 == 0:
                trainer.clock.collect(trainer.device)

        return zhilu_step

    from zhilu.data.corpus import load_corpus
    from zhilu.data.loader import ShardedLoader

    zhilu_step = zhilu_loop(cfg)
    if args.tp_comm:  # the same tensor-parallel step, its traffic not timed apart
        plain_step = zhilu_loop(replace(cfg, metrics=replace(cfg.metrics, tp_comm=False)))
    else:
        corpus = load_corpus(None)
        plain_step = plain_ddp_loop(cfg, model_cfg, ShardedLoader(
            corpus.train, cfg.train.seq_len, cfg.train.global_batch, env.dp_rank, plan.dp, cfg.train.seed))

    times: dict[str, list[float]] = {"zhilu": [], "plain": []}
    for round_ in range(args.rounds):
        pair = (("zhilu", zhilu_step), ("plain", plain_step))
        for name, step in pair if round_ % 2 else pair[::-1]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            dist.barrier()
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) / args.steps_per_round)
    if rank == 0:
        z, p = statistics.median(times["zhilu"]), statistics.median(times["plain"])
        print(f"ranks {world}, gpt-tiny, plan {plan.spec()}, {cfg.train.global_batch} x {cfg.train.seq_len} "
              f"tokens/step, {args.rounds - 2} rounds of {args.steps_per_round} steps each")
        names = ("zhilu, tp_comm untimed", "zhilu, tp_comm timed") if args.tp_comm else ("plain DDP loop", "zhilu")
        print(f"{names[0]:<24}{p * 1e3:8.1f} ms/step (median)")
        print(f"{names[1]:<24}{z * 1e3:8.1f} ms/step (median)")
        print(f"ratio {names[1]} / {names[0]} = {z / p:.3f}")
    shutdown_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--tp-comm", action="store_true", help="the cost of --metrics.tp_comm under tp=NPROC")
    args = parser.parse_args()
    cfg = JobConfig()
    cfg.launch.nproc = args.nproc
    cfg.launch.device = "cpu"
    if args.tp_comm:
        cfg.parallel.plan, cfg.metrics.tp_comm = f"tp={args.nproc}", True
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        cfg.run.out = f"{tmp}/run"
        args.job = prepare(cfg)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(worker, args=(args.nproc, port, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
