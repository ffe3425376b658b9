"""The hardware file's numbers from what the processes measured."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from zhilu.calibrate.shapes import _layer_config
from zhilu.errors import ZhiluError
from zhilu.perf import job
from zhilu.perf.device import Cluster, Device, Link
from zhilu.perf.flops import Transformer
from zhilu.perf.presets import PRESETS, gpu_preset
from zhilu.perf.rates import BYTES, AttentionPoint, MatmulPoint, fit_matmul_tflops, least_squares
from zhilu.perf.step import StepModel
from zhilu.plan import PRECISIONS, Plan, device_precision


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
    key = gpu_preset(first["name"]) if device == "cuda" else "cpu"
    preset = PRESETS[key] if key else None
    sustained = {p: fit_matmul_tflops(matmul, bandwidth, launch, first["compute_units"], p)
                 for p in PRECISIONS}
    if preset is not None and device == "cuda":
        peak, power = dict(preset.device.peak_tflops), preset.device.power_w
    else:  # no datasheet to go by: MFU against the best rate measured here (a product's, or the
        # sustained rate fitted to them where that is higher), so that no prediction exceeds it
        peak = {p: max([m.tflops for m in matmul if m.precision == p] + [sustained[p]]) for p in PRECISIONS}
        power = preset.device.power_w if preset is not None else 700.0
    memory = first["memory_gib"] if device == "cuda" else first["memory_gib"] / nproc
    tier = "nccl" if device == "cuda" else "gloo"
    base = preset or PRESETS["cpu"]
    intra = base.intra
    if first["comm"]:
        intra = replace(base.intra, name=f"{tier}-measured", **fit_link(first["comm"], nproc))
    dev = Device(first["name"], memory_gib=memory, memory_bandwidth_gbps=bandwidth, power_w=power,
                 peak_tflops=peak, matmul_tflops=sustained, attention=attention, matmul=matmul,
                 compute_units=first["compute_units"], launch_us=launch, synchronous=device == "cpu")
    if first["tensor_parallel"] is not None:
        measured = [{**m, **{k: sum(r["tensor_parallel"][i][k] for r in results) / nproc for k in ("layer", "ends")}}
                    for i, m in enumerate(first["tensor_parallel"])]
        dev = replace(dev, **tensor_parallel_overhead(dev, intra, measured, device_precision(device)))
    if first["fsdp"] is not None:
        measured = [{**m, "added": sum(r["fsdp"][i]["added"] for r in results) / nproc}
                    for i, m in enumerate(first["fsdp"])]
        dev = replace(dev, **fsdp_overhead(dev, intra, nproc, measured, device_precision(device)))
    # Between hosts cannot be measured from one: the preset's network tier (or, with none, this one).
    inter = base.inter if device == "cuda" and preset is not None else intra
    return Cluster(f"calibrated {nproc} x {first['name']}", dev, nproc, intra, inter)


def tensor_parallel_overhead(device: Device, link: Link, measured: list[dict[str, Any]],
                             precision: str) -> dict[str, float]:
    """``tp_layer_us``, ``tp_layer_s_per_gb`` and ``tp_ends_us`` from tensor-parallel models measured
    at a tiny and at a training size: what they took beyond the model's prediction from the kernel
    and link measurements, as a fixed time plus a time per byte of the layer's activation."""
    extra = []
    for m in measured:
        shape = m["shape"]
        pair = Cluster("pair", device, 2, link, link)
        steps = StepModel(Transformer(_layer_config(shape, 1), shape["seq_len"]), pair, shape["batch"],
                          job.software("cuda" if precision == "bf16" else "cpu"))
        layer = steps.layer(2, False, shape["batch"], "none", precision)
        ends = steps.ends(2, False, shape["batch"], precision)
        gb = shape["batch"] * shape["seq_len"] * shape["hidden"] * BYTES[precision] / 1e9
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
    points = []
    for m in measured:
        shape = m["shape"]

        def exposed(layers: int) -> float:
            group = Cluster("group", device, nproc, link, link)
            steps = StepModel(Transformer(_layer_config(shape, layers), shape["seq_len"]), group,
                              shape["batch"] * nproc, job.software("cuda" if precision == "bf16" else "cpu"))
            plan = Plan(dp=nproc, zero=3, mb=1, precision=precision)  # micro-batches of shape["batch"]
            return steps.evaluate(plan).breakdown["dp_comm_exposed"]

        gb = Transformer(_layer_config(shape, 1), shape["seq_len"]).layer_params * BYTES[precision] / 1e9
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
    alpha, inv_bw = least_squares(system, target)
    if inv_bw <= 0:
        raise ZhiluError("calibrate", "transfer times did not grow with size; the measurement was disturbed, run again")
    return {"latency_us": max(alpha, 1e-9) * 1e6, "bandwidth_gbps": 1.0 / inv_bw / 1e9}
