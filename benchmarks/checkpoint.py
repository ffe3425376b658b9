"""What a checkpoint save costs the training loop: synchronous against asynchronous, side by side.

    .venv/bin/python benchmarks/checkpoint.py [--model gpt2-124m] [--batch 4] [--seq-len 256]
        [--steps 10] [--saves 3] [--json PATH]
    .venv/bin/python benchmarks/checkpoint.py --model gpt-tiny --steps 6 --saves 1   # smoke run

One process on CPU, one rank, no process group. A training step is the real model's forward,
backward and AdamW step (zhilu's build_optimizer, the default JobConfig().train; no gradient
clipping) on random token batches (torch.randint, fixed seed). Measured in one run:

1. the median step time without any save, after two warm-up steps;
2. synchronous save (Checkpointer(background=False)): how long save() blocks the loop;
3. asynchronous save (background=True): how long save() blocks until it returns; then, while
   the background write runs (the pending future not done, or the finishing thread alive), the
   loop keeps stepping, and the steps done inside the write's window (a step that straddles its
   end counts by its share inside it) per second give the throughput during the write;
   then wait(). Normal throughput for that save is the median of --around steps just before
   the save and --around steps just after the write, so a machine whose speed drifts during
   the run (a shared host) compares each write with its own neighbours.

Each kind saves --saves times into a temporary run directory; after each save the checkpoint
must be complete (checkpoints/latest names it, it has a manifest.json). Prints the medians,
as shares of the median step, against the targets: the asynchronous save blocks at most 5% of a
step and keeps throughput during the write at no less than 90% of normal. Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from zhilu.config import JobConfig
from zhilu.models.registry import resolve
from zhilu.training.checkpoint import Checkpointer
from zhilu.training.optim import build_optimizer


def check_complete(run_dir: Path, step: int) -> Path:
    """The checkpoint of ``step``, after checking that ``latest`` names it and it has a manifest."""
    root = run_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    path = root / name
    if name != f"step-{step:08d}" or not (path / "manifest.json").is_file():
        raise SystemExit(f"checkpoint of step {step} is incomplete: latest={name!r}, "
                         f"manifest={'present' if (path / 'manifest.json').is_file() else 'missing'}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps without saving")
    parser.add_argument("--saves", type=int, default=3, help="saves of each kind")
    parser.add_argument("--around", type=int, default=2,
                        help="steps without saving timed before and after each background write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="parent of the temporary run directory (default: the system's)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    spec = resolve(args.model, seq_len=args.seq_len)
    model = spec.create("cpu", seed=args.seed)
    optimizer = build_optimizer(model, JobConfig().train, "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    step_no = 0

    def step() -> float:
        nonlocal step_no
        start = time.perf_counter()
        tokens = torch.randint(0, spec.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
        loss = spec.loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_no += 1
        return time.perf_counter() - start

    for _ in range(2):  # warm-up; also creates AdamW's state, so the first save holds all of it
        step()
    step_s = statistics.median(step() for _ in range(args.steps))

    sync_block: list[float] = []
    async_block: list[float] = []
    rel_tput: list[float] = []
    write_s: list[float] = []
    steps_in_write: list[float] = []
    neighbour_step_s: list[float] = []  # normal step time around each background write
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run_dir = Path(tmp) / "run"
        sync = Checkpointer(run_dir, keep=1, background=False)
        for _ in range(args.saves):
            step()
            start = time.perf_counter()
            sync.save(step_no, [model], [optimizer], {"step": step_no})
            sync_block.append(time.perf_counter() - start)
            path = check_complete(run_dir, step_no)
        size_mib = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20

        background = Checkpointer(run_dir, keep=1, background=True)
        for _ in range(args.saves):
            before = [step() for _ in range(args.around)]
            saved_at = step_no
            start = time.perf_counter()
            background.save(saved_at, [model], [optimizer], {"step": saved_at})
            returned = time.perf_counter()
            async_block.append(returned - start)
            assert background._pending is not None, "background save left nothing pending"
            future, thread = background._pending
            ended: list[float] = []

            def watch() -> None:  # blocks on the write without spinning; notes when it is over
                try:
                    future.exception()
                    if thread is not None:
                        thread.join()
                finally:
                    ended.append(time.perf_counter())

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            spans = []  # (start, end) of each step begun while the write ran
            while not (future.done() and (thread is None or not thread.is_alive())):
                begun = time.perf_counter()
                step()
                spans.append((begun, time.perf_counter()))
            watcher.join()
            background.wait()
            check_complete(run_dir, saved_at)
            normal = statistics.median(before + [step() for _ in range(args.around)])
            end = ended[0]
            window = end - returned
            done = sum((min(b, end) - max(a, returned)) / (b - a) for a, b in spans if b > returned and a < end)
            write_s.append(window)
            steps_in_write.append(done)
            neighbour_step_s.append(normal)
            rel_tput.append((done / window) * normal if window > 0 and done > 0 else float("nan"))

    sync_share = statistics.median(sync_block) / step_s
    async_share = statistics.median(async_block) / step_s
    finite = [x for x in rel_tput if x == x]  # NaN: the write ended before a step could start
    tput = statistics.median(finite) if finite else float("nan")
    ok_block, ok_tput = async_share <= 0.05, tput >= 0.90
    figures = {
        "model": args.model, "params": n_params, "batch": args.batch, "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(), "checkpoint_mib": size_mib, "saves": args.saves,
        "step_s_median": step_s, "sync_block_s": sync_block, "async_block_s": async_block,
        "async_write_s": write_s, "steps_during_write": steps_in_write, "step_s_around_write": neighbour_step_s,
        "throughput_during_write": rel_tput,
        "sync_block_share": sync_share, "async_block_share": async_share, "throughput_share": tput,
        "target_async_block_share": 0.05, "target_throughput_share": 0.90,
        "async_block_pass": ok_block, "throughput_pass": ok_tput,
    }

    def ms(xs: list[float]) -> str:
        return " ".join(f"{x * 1e3:.0f}" for x in xs)

    print(f"{args.model} ({n_params / 1e6:.1f}M parameters), {args.batch} x {args.seq_len} tokens/step, CPU, "
          f"{torch.get_num_threads()} torch threads; checkpoint {size_mib:.1f} MiB; {args.saves} saves of each kind")
    print(f"median step without saving: {step_s * 1e3:.1f} ms ({args.steps} steps after 2 warm-up steps)")
    print(f"{'':24}{'median':>12}{'share of a step':>18}   each save (ms)")
    for label, xs, extra in (("sync save() blocks", sync_block, ""), ("async save() blocks", async_block, ""),
                             ("async write runs", write_s,
                              f"  (steps inside: {' '.join(f'{d:.2f}' for d in steps_in_write)})")):
        median = statistics.median(xs)
        print(f"{label:24}{median * 1e3:>9.1f} ms{median / step_s:>17.1%}   {ms(xs)}{extra}")
    print(f"asynchronous save blocks {async_share:.1%} of a step (target: at most 5%): "
          f"{'PASS' if ok_block else 'MISS'}")
    print(f"normal step around each background write (ms): {ms(neighbour_step_s)}; "
          f"throughput during each: {' '.join(f'{x:.1%}' for x in rel_tput)}")
    print(f"throughput during the background write: {tput:.1%} of normal (target: at least 90%): "
          f"{'PASS' if ok_tput else 'MISS'}")
    print(f"for comparison, synchronous save blocks {sync_share:.1%} of a step")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
