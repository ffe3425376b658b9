"""``zhilu calibrate``: measure this machine and write the hardware file the performance model reads.

    zhilu calibrate                    # as many processes as `zhilu train` runs by default
    zhilu calibrate --nproc 4          # four processes at once (on a CPU each gets its share of the cores)
    zhilu calibrate --nproc 2 --out hw.toml

All processes measure at the same time, as they run when training, so a device's rates are
those it reaches while the others work too. Measured per process: a transformer layer's
matrix products in their forward, input-gradient and weight-gradient forms (fp32 and bf16),
fused causal attention (SDPA) across sequence lengths and head sizes, the bandwidth of an
elementwise kernel, and the host time of one small op under autograd. Over the real process
group (gloo on CPU, NCCL on GPUs): all-reduce, reduce-scatter, all-gather and send/recv
across sizes, fitted to ``latency per ring step + bytes on the wire / bandwidth``
(:mod:`zhilu.perf.comm`); and zhilu's tensor-parallel layer (DTensor, pairs of processes) at
two sizes, for what it takes beyond its kernels and collectives. The file goes to
:func:`zhilu.hardware.calibrated_path` unless ``--out`` says otherwise; ``zhilu plan
--hardware FILE`` and ``zhilu train`` read it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from zhilu import hardware
from zhilu.errors import ZhiluError
from zhilu.hardware import AttentionPoint, Cluster, Device, Link, MatmulPoint
from zhilu.models.presets import GPTConfig
from zhilu.perf.comm import COLLECTIVES
from zhilu.perf import job
from zhilu.perf.flops import Transformer

# Products of a transformer layer, [tokens, k] x [k, n] (n, k: a weight's shape), each in the three
# forms training runs it: forward (F.linear), the input gradient and the weight gradient.
_CPU_LAYERS = [(t, n, k) for t in (512, 2048) for n, k in ((128, 128), (128, 512), (512, 128), (512, 512))]
_GPU_LAYERS = [(t, n, k) for t in (4096, 16384) for n, k in ((1024, 4096), (4096, 1024), (4096, 4096),
                                                              (12288, 4096))]
_CPU_ATTENTION = [(s, d) for s in (128, 256, 512) for d in (32, 64)]
_GPU_ATTENTION = [(s, d) for s in (1024, 2048, 4096) for d in (64, 128)]
# Layers, tensor-parallel, timed whole against the model's prediction: tiny, and at a training size.
_TINY_LAYER = {"hidden": 32, "heads": 4, "ffn": 64, "seq_len": 16, "batch": 1}
_CPU_LAYER = {"hidden": 256, "heads": 4, "ffn": 768, "seq_len": 256, "batch": 8}
_GPU_LAYER = {"hidden": 4096, "heads": 32, "ffn": 14336, "seq_len": 2048, "batch": 1}
# ZeRO-3 layers, small and larger, for what FSDP adds per collective and per byte.
_FSDP_LAYERS = ({"hidden": 64, "heads": 4, "ffn": 192, "seq_len": 64, "batch": 1},
                {"hidden": 256, "heads": 4, "ffn": 768, "seq_len": 256, "batch": 2})
_PASSES = 3
_CPU_SIZES = [4 ** i for i in range(6, 13)]  # 4 KiB .. 16 MiB
_GPU_SIZES = [4 ** i for i in range(8, 15)]  # 64 KiB .. 256 MiB


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
    out = Path(args.out) if args.out else hardware.calibrated_path(device, nproc)
    if out.suffix != ".toml":
        raise ZhiluError("out", f"{out} must end in .toml")
    try:  # a file can be written there: found out before measuring, not after
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise ZhiluError("out", f"cannot write in {out.parent} ({e.strerror}); give another --out") from None
    print(f"calibrating {nproc} x {device} process{'es' * (nproc > 1)} (about half a minute)", flush=True)
    c = calibrate(device, nproc)
    hardware.save(c, out)
    d, precision = c.device, job.precision(device)
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
        from zhilu.launch import run_local

        results = run_local(measure, (device,), nproc)
    return fit(device, nproc, list(results.values()))


# --- per process ---------------------------------------------------------------------------------

def measure(device_type: str) -> dict[str, Any]:
    """What one process measures (every process of the job at once); a plain dict, no tensors."""
    import torch.distributed as dist

    from zhilu.parallel.mesh import join_group

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = join_group(device_type)
    try:
        out = _measure_device(device)
        out["comm"] = _measure_comm(device) if world > 1 else []
        out["tensor_parallel"] = _measure_tensor_parallel(device) if world % 2 == 0 else None
        out["fsdp"] = _measure_fsdp(device) if world > 1 else None
        return out
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _timer(device: Any) -> Callable[[Callable[[], Any], float], float]:
    """Median seconds per call of ``fn``, over repeats filling about ``budget`` seconds."""
    import torch
    import torch.distributed as dist

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Callable[[], Any], budget: float = 0.1) -> float:
        if dist.is_initialized():
            dist.barrier()  # every process measures at the same time
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - start, 1e-7)
        if dist.is_initialized():  # the same repeats everywhere, or collectives would not pair up
            once = _agreed(once)
        reps = max(1, min(50, int(budget / 5 / once)))
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            samples.append((time.perf_counter() - start) / reps)
        return statistics.median(samples)

    return timed


def _measure_device(device: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    timed = _timer(device)
    gpu = device.type == "cuda"
    train_dtype = torch.bfloat16 if gpu else torch.float32
    probes: list[tuple[dict[str, Any], Callable[[], Any], float]] = []  # (record, call, FLOPs of a call)
    for dtype in (torch.float32, torch.bfloat16):
        shapes = _GPU_LAYERS if gpu else _CPU_LAYERS
        for tokens, n, k in (shapes if dtype == train_dtype else shapes[-1:]):
            for (m_, n_, k_), call, flops in _products(device, dtype, tokens, n, k):
                record = {"precision": "bf16" if dtype == torch.bfloat16 else "fp32", "m": m_, "n": n_, "k": k_}
                probes.append((record, call, flops))
    n_products = len(probes)
    for s, d in _GPU_ATTENTION if gpu else _CPU_ATTENTION:
        heads = max(1, (2 ** 26 if gpu else 2 ** 19) // (s * d))
        q, k, v = (torch.randn(1, heads, s, d, device=device, dtype=train_dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, heads, s, d, device=device, dtype=train_dtype)

        def step(q=q, k=k, v=v, grad=grad) -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        probes.append(({"precision": "bf16" if gpu else "fp32", "seq_len": s, "head_dim": d}, step,
                       0.5 * 3.5 * 4 * heads * s * s * d))
    # Machine noise comes in bursts: every probe is timed in each of several passes, and the
    # median of its passes kept.
    samples: list[list[float]] = [[] for _ in probes]
    for _ in range(_PASSES):
        for i, (_, call, _) in enumerate(probes):
            samples[i].append(timed(call, 0.03))
    for (record, _, flops), times in zip(probes, samples):
        record["tflops"] = flops / statistics.median(times) / 1e12
    # an elementwise product of activation-sized tensors: reads two, writes one
    nbytes = 2 ** 28 if gpu else 2 ** 24
    a, b, c = (torch.ones(nbytes // 4, device=device) for _ in range(3))
    bandwidth = 3 * nbytes / timed(lambda: torch.mul(a, b, out=c)) / 1e9
    # the host time of one small op under autograd, forward and backward (what eager training pays per op)
    x = torch.ones(8, device=device, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(50):
            y = y * 1.0001
        y.sum().backward()

    launch_us = timed(chain) / 101 * 1e6
    return {"matmul": [p[0] for p in probes[:n_products]], "attention": [p[0] for p in probes[n_products:]],
            "bandwidth_gbps": bandwidth, "launch_us": launch_us,
            "name": torch.cuda.get_device_name(device) if gpu else _cpu_name(),
            "memory_gib": torch.cuda.mem_get_info(device)[1] / 2 ** 30 if gpu else _ram_gib(),
            "compute_units": torch.cuda.get_device_properties(device).multi_processor_count if gpu else 1}


Probe = tuple[tuple[int, int, int], Callable[[], Any], float]


def _products(device: Any, dtype: Any, tokens: int, n: int, k: int) -> list[Probe]:
    """One weight's forward, input-gradient and weight-gradient products, as ``((m, n, k), call,
    FLOPs)`` of ``[m, k] x [k, n]``. Operands rotate through several copies, so they come from
    memory as in training, not from a cache warmed by the repeats."""
    import torch
    import torch.nn.functional as F

    copies = 2 if device.type == "cuda" else 4
    x = [torch.randn(tokens, k, device=device, dtype=dtype) for _ in range(copies)]
    w = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
    g = [torch.randn(tokens, n, device=device, dtype=dtype) for _ in range(copies)]
    turn = [0]

    def rotating(op: Callable[[int], Any]) -> Callable[[], Any]:
        def call() -> Any:
            turn[0] = (turn[0] + 1) % copies
            return op(turn[0])
        return call

    flops = 2.0 * tokens * n * k
    forms = (((tokens, n, k), lambda i: F.linear(x[i], w[i])),  # y = x w^T
             ((tokens, k, n), lambda i: g[i] @ w[i]),  # dx = dy w
             ((n, k, tokens), lambda i: g[i].t() @ x[i]))  # dw = dy^T x
    return [(shape, rotating(op), flops) for shape, op in forms]


def _layer_config(shape: dict[str, int], layers: int) -> GPTConfig:
    return GPTConfig(n_layers=layers, hidden=shape["hidden"], n_heads=shape["heads"], ffn_hidden=shape["ffn"],
                     vocab_size=256, max_seq_len=shape["seq_len"])


def _layer_seconds(device: Any, shape: dict[str, int], wrap: Callable[[Any], Any],
                   context: Callable[[], Any] = contextlib.nullcontext) -> tuple[float, float]:
    """Forward and backward of zhilu's model at ``shape``, wrapped by ``wrap``: seconds of one layer
    (models of 1 and 3 layers timed, the difference halved) and of the rest (embedding, output, loss)."""
    import torch

    from zhilu.models.gpt import build_model, loss_fn

    timed = _timer(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    x = torch.randint(0, 256, (shape["batch"], shape["seq_len"]), device=device)
    seconds = {}
    for layers in (1, 3):
        model = wrap(build_model(_layer_config(shape, layers), device))

        def step(model=model) -> None:
            with context():
                with autocast:
                    loss = loss_fn(model(x), x)
                loss.backward()

        seconds[layers] = statistics.median(timed(step, 0.2) for _ in range(_PASSES))
    layer = (seconds[3] - seconds[1]) / 2
    return layer, seconds[1] - layer


def _measure_tensor_parallel(device: Any) -> list[dict[str, Any]]:
    """Seconds of one of zhilu's tensor-parallel layers (tp=2) and of the rest of the model, at a
    tiny size (host and waiting time alone) and at a training size. Every pair of processes runs
    its own tensor-parallel group, all at once."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from zhilu.parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh(device.type, (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))

    def tensor_parallel(model: Any) -> Any:
        apply_tensor_parallel(model, mesh["tp"], False)
        return model

    out = []
    for shape in (_TINY_LAYER, _GPU_LAYER if device.type == "cuda" else _CPU_LAYER):
        layer, ends = _layer_seconds(device, shape, tensor_parallel, loss_parallel)
        out.append({"shape": shape, "layer": layer, "ends": ends})
    return out


def _measure_fsdp(device: Any) -> list[dict[str, Any]]:
    """Seconds that ZeRO-3 (zhilu's FSDP2 over every process) adds to one layer, forward and
    backward, at two sizes: the layer timed with and without it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from zhilu.parallel.data_parallel import apply_data_parallel
    from zhilu.parallel.mesh import ParallelEnv
    from zhilu.plan import Plan

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (1, world, 1), mesh_dim_names=("pp", "dp", "tp"))
    env = ParallelEnv(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)),
                      int(os.environ.get("LOCAL_WORLD_SIZE", world)), device, mesh)
    out = []
    for shape in _FSDP_LAYERS:
        plain, _ = _layer_seconds(device, shape, lambda model: model)
        sharded, _ = _layer_seconds(device, shape, lambda model: apply_data_parallel(model, Plan(dp=world, zero=3), env))
        out.append({"shape": shape, "added": sharded - plain})
    return out


def _measure_comm(device: Any) -> list[dict[str, Any]]:
    """Seconds of each collective and of a one-way send across sizes (every process takes part)."""
    import torch
    import torch.distributed as dist

    timed = _timer(device)
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for nbytes in _GPU_SIZES if device.type == "cuda" else _CPU_SIZES:
        full = torch.ones(nbytes // 4, device=device)
        shard = torch.ones(nbytes // 4 // n, device=device)
        ops = {"all_reduce": lambda: dist.all_reduce(full),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full),
               "all_gather": lambda: dist.all_gather_into_tensor(full, shard)}
        assert set(ops) == set(COLLECTIVES)
        for kind, op in ops.items():
            rows.append({"kind": kind, "bytes": nbytes, "seconds": _agreed(timed(op, 0.05))})

        def ping_pong() -> None:  # ranks 0 and 1; the others wait
            if rank == 0:
                dist.send(full, 1)
                dist.recv(full, 1)
            elif rank == 1:
                dist.recv(full, 0)
                dist.send(full, 0)

        rows.append({"kind": "p2p", "bytes": nbytes, "seconds": _agreed(timed(ping_pong, 0.05)) / 2})
    return rows


def _agreed(seconds: float) -> float:
    """The slowest process's time: a collective ends when its last member is done."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return hardware.PRESETS["cpu"].device.memory_gib


# --- fitting ---------------------------------------------------------------------------------------

def fit(device: str, nproc: int, results: list[dict[str, Any]]) -> Cluster:
    """A :class:`Cluster` of ``nproc`` devices from what each process measured."""
    first = results[0]

    def mean(key: str, i: int | None = None, field: str = "tflops") -> float:
        values = [r[key][i][field] if i is not None else r[key] for r in results]
        return sum(values) / len(values)

    matmul = tuple(MatmulPoint(p["m"], p["n"], p["k"], mean("matmul", i), p["precision"])
                   for i, p in enumerate(first["matmul"]))
    attention = tuple(AttentionPoint(p["seq_len"], p["head_dim"], mean("attention", i), p["precision"])
                      for i, p in enumerate(first["attention"]))
    bandwidth, launch = mean("bandwidth_gbps"), mean("launch_us")
    key = hardware.gpu_preset(first["name"]) if device == "cuda" else "cpu"
    preset = hardware.PRESETS[key] if key else None
    sustained = {p: hardware.fit_matmul_tflops(matmul, bandwidth, launch, first["compute_units"], p)
                 for p in hardware.PRECISIONS}
    if preset is not None and device == "cuda":
        peak, power = dict(preset.device.peak_tflops), preset.device.power_w
    else:  # no datasheet to go by: MFU against the best product measured here
        peak = {p: max(m.tflops for m in matmul if m.precision == p) for p in hardware.PRECISIONS}
        power = preset.device.power_w if preset is not None else 700.0
    memory = first["memory_gib"] if device == "cuda" else first["memory_gib"] / nproc
    tier = "nccl" if device == "cuda" else "gloo"
    base = preset or hardware.PRESETS["cpu"]
    intra = base.intra
    if first["comm"]:
        intra = replace(base.intra, name=f"{tier}-measured", **fit_link(first["comm"], nproc))
    dev = Device(first["name"], memory_gib=memory, memory_bandwidth_gbps=bandwidth, power_w=power,
                 peak_tflops=peak, matmul_tflops=sustained, attention=attention, matmul=matmul,
                 compute_units=first["compute_units"], launch_us=launch, synchronous=device == "cpu")
    if first["tensor_parallel"] is not None:
        measured = [{**m, **{k: sum(r["tensor_parallel"][i][k] for r in results) / nproc for k in ("layer", "ends")}}
                    for i, m in enumerate(first["tensor_parallel"])]
        dev = replace(dev, **tensor_parallel_overhead(dev, intra, measured, job.precision(device)))
    if first["fsdp"] is not None:
        measured = [{**m, "added": sum(r["fsdp"][i]["added"] for r in results) / nproc}
                    for i, m in enumerate(first["fsdp"])]
        dev = replace(dev, **fsdp_overhead(dev, intra, nproc, measured, job.precision(device)))
    # Between hosts cannot be measured from one: the preset's network tier (or, with none, this one).
    inter = base.inter if device == "cuda" and preset is not None else intra
    return Cluster(f"calibrated {nproc} x {first['name']}", dev, nproc, intra, inter)


def tensor_parallel_overhead(device: Device, link: Link, measured: list[dict[str, Any]],
                             precision: str) -> dict[str, float]:
    """``tp_layer_us``, ``tp_layer_s_per_gb`` and ``tp_ends_us`` from tensor-parallel models measured
    at a tiny and at a training size: what they took beyond the model's prediction from the kernel
    and link measurements, as a fixed time plus a time per byte of the layer's activation."""
    from zhilu.perf.step import StepModel

    extra = []
    for m in measured:
        shape = m["shape"]
        pair = Cluster("pair", device, 2, link, link)
        steps = StepModel(Transformer(_layer_config(shape, 1), shape["seq_len"]), pair, shape["batch"],
                          job.software("cuda" if precision == "bf16" else "cpu"))
        layer = steps.layer(2, False, shape["batch"], "none", precision)
        ends = steps.ends(2, False, shape["batch"], precision)
        gb = shape["batch"] * shape["seq_len"] * shape["hidden"] * hardware.BYTES[precision] / 1e9
        extra.append((gb, m["layer"] - (layer.compute + layer.tp + layer.other),
                      m["ends"] - sum(e.compute + e.tp + e.other for e in ends)))
    (gb_small, layer_small, ends_small), (gb_big, layer_big, _) = extra
    per_gb = max(0.0, (layer_big - layer_small) / (gb_big - gb_small))
    return {"tp_layer_us": max(0.0, layer_small - per_gb * gb_small) * 1e6, "tp_layer_s_per_gb": per_gb,
            "tp_ends_us": max(0.0, ends_small - per_gb * gb_small) * 1e6}


def fsdp_overhead(device: Device, link: Link, nproc: int, measured: list[dict[str, Any]],
                  precision: str) -> dict[str, float]:
    """``fsdp_step_us`` and ``fsdp_s_per_gb``: what ZeRO-3 was measured to add to a layer at two
    sizes, less what the model adds for it (gathers, reduce-scatter, copies), per collective and
    ring step (three collectives of ``nproc - 1`` steps), as a fixed time plus a time per byte
    of the layer's weights."""
    from zhilu.perf.step import Plan, StepModel

    points = []
    for m in measured:
        shape = m["shape"]

        def exposed(layers: int) -> float:
            group = Cluster("group", device, nproc, link, link)
            steps = StepModel(Transformer(_layer_config(shape, layers), shape["seq_len"]), group,
                              shape["batch"] * nproc, job.software("cuda" if precision == "bf16" else "cpu"))
            plan = Plan(nproc, 1, 1, zero=3, micro_batch=shape["batch"], precision=precision)
            return steps.evaluate(plan).breakdown["dp_comm_exposed"]

        gb = Transformer(_layer_config(shape, 1), shape["seq_len"]).layer_params * hardware.BYTES[precision] / 1e9
        points.append((gb, max(0.0, m["added"] - (exposed(3) - exposed(1)) / 2) / 3 / (nproc - 1)))
    (gb_small, small), (gb_big, big) = points
    per_gb = max(0.0, (big - small) / (gb_big - gb_small))
    return {"fsdp_step_us": max(0.0, small - per_gb * gb_small) * 1e6, "fsdp_s_per_gb": per_gb}


def fit_link(rows: list[dict[str, Any]], n: int) -> dict[str, float]:
    """``latency_us`` and ``bandwidth_gbps`` of the ring model that best explain measured transfers.

    A ring all-reduce over ``n`` takes ``2 (n - 1)`` steps and puts ``2 (n - 1) / n`` of the
    tensor on the wire, a reduce-scatter or all-gather half of each, a send one step and the
    whole tensor. Least squares on relative error, so small and large transfers count alike.
    """
    system, target = [], []
    for r in rows:
        steps, wire = {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n), "reduce_scatter": (n - 1, (n - 1) / n),
                       "all_gather": (n - 1, (n - 1) / n), "p2p": (1, 1.0)}[r["kind"]]
        t = r["seconds"]
        system.append([steps / t, wire * r["bytes"] / t])
        target.append(1.0)
    alpha, inv_bw = hardware.least_squares(system, target)
    if inv_bw <= 0:
        raise ZhiluError("calibrate", "transfer times did not grow with size; the measurement was disturbed, run again")
    return {"latency_us": max(alpha, 1e-9) * 1e6, "bandwidth_gbps": 1.0 / inv_bw / 1e9}
