"""``zhilu calibrate``: the command, and :func:`calibrate` (measure, then fit)."""

from __future__ import annotations

import argparse
from pathlib import Path

from zhilu.calibrate.fit import fit
from zhilu.calibrate.probes import measure
from zhilu.errors import ZhiluError
from zhilu.launch.run_dir import unwritable
from zhilu.perf.device import Cluster
from zhilu.perf.hardware_file import calibrated_path, save
from zhilu.plan import device_precision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, help="processes that run at once (default: 1 on CPU, one per GPU)")
    parser.add_argument("--out", metavar="FILE", help="hardware file to write (default: this machine's, "
                                                      "in ~/.cache/zhilu; zhilu train reads it from there)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="what to measure")


def run(args: argparse.Namespace) -> int:
    """Measure, write the hardware file, print what was measured."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ZhiluError("device", "cuda was asked for but no CUDA device is visible; valid here: cpu or auto")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    nproc = args.nproc if args.nproc is not None else max(gpus, 1)
    if nproc < 1 or (device == "cuda" and nproc > gpus):
        valid = f"1-{gpus}" if device == "cuda" else "a positive integer"
        raise ZhiluError("nproc", f"{nproc} processes; valid: {valid}")
    out = Path(args.out) if args.out else calibrated_path(device, nproc)
    problem = unwritable(out, directory=False)  # found out before measuring, not after; nothing is created
    if problem:
        raise ZhiluError("out", f"{problem}; valid: a .toml file path that can be written")
    if out.suffix != ".toml":
        raise ZhiluError("out", f"{out} must end in .toml")
    print(f"calibrating {nproc} x {device} process{'es' * (nproc > 1)} (about half a minute)", flush=True)
    c = calibrate(device, nproc)
    save(c, out)
    d, precision = c.device, device_precision(device)
    best = max(p.tflops for p in d.matmul if p.precision == precision)
    print(f"{d.name}: products up to {best * 1e3:,.1f} GFLOP/s ({precision}), sustained "
          f"{d.matmul_tflops[precision] * 1e3:,.1f}; elementwise {d.memory_bandwidth_gbps:,.1f} GB/s; "
          f"{d.launch_us:.1f} us per op")
    if nproc > 1:
        print(f"{c.intra.name}: {c.intra.latency_us:.1f} us per ring step, {c.intra.bandwidth_gbps:.2f} GB/s")
    if d.tp_layer_us:
        print(f"tensor-parallel layer: {d.tp_layer_us / 1e3:,.1f} ms + {d.tp_layer_s_per_gb:.2f} s/GB of activation "
              "beyond its kernels and collectives")
    print(f"wrote {out}")
    return 0


def calibrate(device: str, nproc: int) -> Cluster:
    """Measure ``nproc`` processes on ``device`` at once and fit a :class:`Cluster` of them."""
    if nproc == 1:
        results = {0: measure(device)}
    else:
        from zhilu.launch.local import run_local

        results = run_local(measure, (device,), nproc)
    return fit(device, nproc, list(results.values()))
