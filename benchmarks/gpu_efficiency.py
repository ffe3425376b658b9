"""zhilu's training step on one CUDA GPU against a plain compiled PyTorch loop, side by side.

    python benchmarks/gpu_efficiency.py [--model gpt-1.3b] [--batch 8] [--seq-len 2048] [--rounds 8]

Model gpt-1.3b (24 layers, hidden 2048, 16 heads), sequence 2048, bf16 autocast, fused
AdamW, torch.compile in both. The two loops alternate in rounds in one process; the dense
bf16 matmul rate (8192^3) is measured in the same run. Prints each loop's model TFLOP/s
(6N + 12 L h s FLOPs per token), its share of the matmul rate, and the ratio zhilu / plain
in throughput (target: >= 0.98). Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from zhilu.config import JobConfig
from zhilu.launch.prepare import prepare
from zhilu.models.gpt import build_model
from zhilu.monitor.matmul_rate import measure_matmul_flops
from zhilu.parallel.mesh import init_parallel
from zhilu.spec import token_cross_entropy as loss_fn
from zhilu.training.trainer import Trainer
from zhilu.training.optim import lr_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-1.3b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipped (run this on a machine with one)")
        return

    cfg = JobConfig()
    cfg.model.name, cfg.model.compile = args.model, True
    cfg.train.global_batch, cfg.train.seq_len = args.batch, args.seq_len
    cfg.launch.device, cfg.launch.nproc = "cuda", 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.out = f"{tmp}/run"
        cfg, plan, spec = prepare(cfg)
        trainer = Trainer(cfg, plan, spec, init_parallel(plan, "cuda"))
    model_cfg = spec.shape
    device = trainer.device

    model = torch.compile(build_model(model_cfg, device, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    plain_steps = 0

    def plain_step() -> None:
        nonlocal plain_steps
        x, y = trainer.next_batch()
        for group in opt.param_groups:
            group["lr"] = lr_at(plain_steps, cfg.train)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        plain_steps += 1

    def zhilu_step() -> None:
        trainer.train_step(*trainer.next_batch())

    times: dict[str, list[float]] = {"zhilu": [], "plain": []}
    for round_ in range(args.rounds):
        order = (("zhilu", zhilu_step), ("plain", plain_step))
        for name, step in order if round_ % 2 else order[::-1]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            torch.cuda.synchronize()
            if round_ >= 2:  # the first rounds compile and warm up
                times[name].append((time.perf_counter() - start) / args.steps_per_round)
    matmul = measure_matmul_flops(device, torch.bfloat16, size=8192, seconds=2.0)
    flops_per_step = model_cfg.flops_per_token(args.seq_len) * args.batch * args.seq_len
    print(f"{torch.cuda.get_device_name()}, {args.model} ({model_cfg.num_params() / 1e9:.2f}B), "
          f"batch {args.batch} x {args.seq_len}, bf16, compiled; matmul rate {matmul / 1e12:.0f} TFLOP/s")
    result = {}
    for name in ("plain", "zhilu"):
        t = statistics.median(times[name])
        result[name] = flops_per_step / t
        print(f"{name:<6} {t * 1e3:8.1f} ms/step  {result[name] / 1e12:6.1f} model TFLOP/s  "
              f"{100 * result[name] / matmul:5.1f}% of matmul rate")
    print(f"ratio zhilu / plain = {result['zhilu'] / result['plain']:.3f}")


if __name__ == "__main__":
    main()
