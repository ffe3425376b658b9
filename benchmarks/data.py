"""Data throughput: `zhilu data prepare` per core, and the prepared-data loader against a training step.

    python benchmarks/data.py [--tokenizer bpe:8192] [--steps 3] [--batches 200]

1. Prepares the Python standard library (the default job's corpus) with 1 worker and with
   one per CPU, into fresh directories, and prints MB of source text per second of wall
   time and per CPU-second (its own and its workers'; the tokenizers library also uses threads
   of its own), and checks that both outputs are byte-identical.
2. For the default job (gpt-tiny, 16 x 256 tokens) and for gpt2-124m (16 x 1024 tokens),
   on that prepared dataset: the time the loader takes for one global batch (the median of
   ``--batches``) beside the time of one training step of the model on this machine
   (forward, backward, AdamW; the median of ``--steps`` after one warm-up), measured in
   turns in this one run. Prints the loader's share of a step (target: at most 1%) and its
   tokens/s against the tokens/s a step consumes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from zhilu.data.manifest import read
from zhilu.data.prepare import PrepareOptions, prepare
from zhilu.data.prepared import DocumentLoader, open_dataset
from zhilu.data.tokenizer import TokenizerChoice
from zhilu.models.gpt import build_model
from zhilu.models.presets import preset
from zhilu.spec import token_cross_entropy

JOBS = {"gpt-tiny (the default job)": ("gpt-tiny", 16, 256), "gpt2-124m": ("gpt2-124m", 16, 1024)}


def tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def prepare_throughput(tokenizer: str, root: Path) -> Path:
    cpus = len(os.sched_getaffinity(0))
    options = PrepareOptions(tokenizer=TokenizerChoice.parse(tokenizer))
    outs = {}
    for workers in sorted({1, cpus}):
        out = root / f"stdlib-{workers}"
        start, cpu = time.perf_counter(), _cpu_seconds()
        manifest = prepare(["stdlib"], out, options, workers, say=lambda line: None)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        mb = manifest["counts"]["bytes_in"] / 1e6
        print(f"prepare stdlib --tokenizer {tokenizer} --workers {workers}: {mb:.1f} MB in {wall:.1f} s = "
              f"{mb / wall:.2f} MB/s; {cpu:.1f} CPU-seconds = {mb / cpu:.2f} MB/s per core")
        outs[workers] = out
    if len(outs) > 1:
        print("outputs byte-identical:", tree(outs[1]) == tree(outs[cpus]))
    return outs[1]


def _cpu_seconds() -> float:
    """User and system CPU time of this process and of its finished children (the workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def loader_share(data: Path, steps: int, batches: int) -> bool:
    dataset = open_dataset(data, verify=True)
    vocab = -(-dataset.vocab_size // 128) * 128
    ok = True
    for label, (name, batch, seq_len) in JOBS.items():
        model = build_model(preset(name, vocab_size=vocab, max_seq_len=seq_len))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loader = DocumentLoader(dataset.split("train"), seq_len, batch, 0, 1, seed=0)
        step_times, load_times = [], []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            for _ in range(batches):
                x, y = loader.next_batch()
            load_times.append((time.perf_counter() - t0) / batches)
            t0 = time.perf_counter()
            token_cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step warms up
                step_times.append(time.perf_counter() - t0)
        load, step = statistics.median(load_times), statistics.median(step_times)
        share = load / step
        ok &= share <= 0.01
        tokens = batch * seq_len
        print(f"{label}: {batch} x {seq_len} tokens, vocabulary {vocab}: loader {load * 1e3:.3f} ms per batch "
              f"({tokens / load:,.0f} tokens/s), step {step:.3f} s ({tokens / step:,.0f} tokens/s); loader share "
              f"{share:.3%} of a step {'PASS' if share <= 0.01 else 'FAIL'} (target at most 1%)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="bpe:8192")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_throughput(args.tokenizer, Path(tmp))
        manifest, _ = read(data)
        print(f"dataset: {manifest['counts']['documents_kept']:,} documents, {manifest['counts']['tokens']:,} tokens")
        return 0 if loader_share(data, args.steps, args.batches) else 1


if __name__ == "__main__":
    sys.exit(main())
