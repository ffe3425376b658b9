"""Devices, links and clusters: what the performance model needs to know about the hardware.

A :class:`Device` is described by its *achieved* rates, not its datasheet: the sustained
tensor-core rate of a large matrix product, the bandwidth a copy reaches, the rate of a
causal flash-attention kernel by sequence length and head size. A :class:`Cluster` is a
device x devices per node x nodes, joined by two :class:`Link` tiers (inside a node and
between nodes). Presets cover ``a100-40gb``, ``a100-80gb``, ``h100-sxm``, ``h200``,
``v100-32gb`` and ``cpu``; :func:`load` reads a TOML hardware file (as written by
:func:`dump`, e.g. by ``zhilu calibrate``).

Units: rates in TFLOP/s, bandwidths in GB/s (10**9 bytes), memory in GiB, latency in us.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from statistics import NormalDist, median
from typing import Any

from zhilu.errors import ZhiluError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRECISIONS = ("bf16", "fp32")
BYTES = {"bf16": 2, "fp32": 4}
# Output tile of cuBLAS's large bf16 kernels on Ampere and Hopper (CUTLASS's 128 x 256 x 64): one tile
# per SM at a time, so a product runs in whole waves of tiles.
_TILE_M, _TILE_N = 128, 256


# A product whose output tiles cannot fill the device is split along its reduction (cuBLAS's split-K
# and, on Hopper, stream-K kernels), each split keeping at least this much of it (8 of the main
# loop's 64-deep k-blocks), the partial fp32 tiles summed afterwards.
_SPLIT_K_MIN = 512


def wave_fill(m: int, n: int, count: int, compute_units: int) -> float:
    """Fraction of the compute units a product keeps busy: its tiles over its whole waves of tiles."""
    tiles = math.ceil(m / _TILE_M) * math.ceil(n / _TILE_N) * count
    return tiles / (math.ceil(tiles / compute_units) * compute_units)


def k_splits(m: int, n: int, k: int, count: int, compute_units: int) -> int:
    """Ways a product's reduction is split: as many as fill the units its output tiles leave idle
    (1 when the tiles fill a wave), each split at least ``_SPLIT_K_MIN`` long."""
    tiles = math.ceil(m / _TILE_M) * math.ceil(n / _TILE_N) * count
    return max(1, min(compute_units // tiles, k // _SPLIT_K_MIN))


@dataclass(frozen=True)
class MatmulPoint:
    """One measured matrix product ``[m, k] @ [k, n]`` and the rate it reached."""

    m: int
    n: int
    k: int
    tflops: float
    precision: str = "bf16"


@dataclass(frozen=True)
class AttentionPoint:
    """One measured causal flash-attention forward+backward at ``seq_len`` and ``head_dim``.

    ``tflops`` counts the FLOPs the kernel executes: half of ``3.5 * 4 * B*H*T^2*D``
    because a causal kernel skips the masked half of the score matrix.
    """

    seq_len: int
    head_dim: int
    tflops: float
    precision: str = "bf16"


@dataclass(frozen=True)
class Link:
    """One link tier, alpha-beta: ``time = steps * latency + bytes_on_wire / bandwidth``.

    ``bandwidth_gbps`` is the bus bandwidth per device that a collective reaches (the
    ``busbw`` of nccl-tests), ``latency_us`` the cost of one ring step. ``compute_share`` is
    the fraction of the device's compute a collective on this tier occupies while it runs
    (NCCL runs one thread block per channel, each on its own SM), which is what overlapping
    it with compute costs.
    """

    name: str
    latency_us: float
    bandwidth_gbps: float
    compute_share: float = 0.0


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU process) by what code achieves on it."""

    name: str
    memory_gib: float  # capacity PyTorch can allocate
    memory_bandwidth_gbps: float  # achieved copy bandwidth, read + write
    power_w: float  # board power at full load (energy estimates)
    peak_tflops: dict[str, float]  # datasheet dense rate per precision: the MFU denominator
    matmul_tflops: dict[str, float]  # sustained main-loop rate of a large GEMM, per precision
    attention: tuple[AttentionPoint, ...] = ()  # flash-attention rates; empty: no fused kernel
    matmul: tuple[MatmulPoint, ...] = ()  # measured products the rates were fitted to
    compute_units: int = 1  # SMs of a GPU (a GEMM needs one output tile per unit to fill it)
    launch_us: float = 10.0  # host time to issue one kernel (eager PyTorch)
    rate_spread: float = 0.0  # relative standard deviation of the sustained rate between devices
    # The host runs the kernels itself (a CPU): the time to issue an op adds to its work instead
    # of overlapping with the kernels already queued on a device.
    synchronous: bool = False
    # What one tensor-parallel layer (forward and backward) and the embedding, output and loss
    # take under DTensor beyond their kernels and collectives as modelled (DTensor's host work per
    # op, ranks waiting on each other at every collective, collectives slower amid compute): a
    # fixed time plus seconds per GB of the layer's [tokens, hidden] activation. Measured by
    # `zhilu calibrate` on zhilu's runtime; 0 where unknown.
    tp_layer_us: float = 0.0
    tp_layer_s_per_gb: float = 0.0
    tp_ends_us: float = 0.0
    # What each FSDP collective of one unit (a layer's all-gather or reduce-scatter) takes in a
    # step beyond the link model, per ring step: a fixed time plus seconds per GB of the unit's
    # weights (on a CPU the process group's thread waits for a core while the others compute,
    # and the unit's hooks and copies run). Measured by `zhilu calibrate`; 0 where unknown.
    fsdp_step_us: float = 0.0
    fsdp_s_per_gb: float = 0.0

    def slowest_of(self, n: int) -> Device:
        """The device a synchronous job of ``n`` devices runs at: the expected slowest of ``n``.

        Silicon and cooling differ, so sustained rates spread with ``rate_spread``; every
        collective waits for the slowest device. The expected maximum of ``n`` standard
        normals is ``Phi^-1((n - 0.375) / (n + 0.25))`` (Blom's approximation).
        """
        if n < 2 or not self.rate_spread:
            return self
        scale = 1.0 - self.rate_spread * NormalDist().inv_cdf((n - 0.375) / (n + 0.25))
        return replace(self, matmul_tflops={p: r * scale for p, r in self.matmul_tflops.items()},
                       attention=tuple(replace(a, tflops=a.tflops * scale) for a in self.attention))

    def gemm_seconds(self, m: int, n: int, k: int, precision: str = "bf16", count: int = 1) -> float:
        """Time of ``count`` products ``[m, k] @ [k, n]``.

        The tensor cores stream the operands while they multiply, but the output tile's
        store and the pipeline fill are not hidden: ``time = flops / (rate * fill) +
        2 * output_bytes / bandwidth``, with ``fill`` the busy share of the last wave of tiles
        (:func:`wave_fill`). Efficiency therefore falls with a short reduction dimension ``k``
        and with an output too small to fill the device, unless a long reduction lets it be
        split (:func:`k_splits`). A product whose operands alone take longer to read is
        memory-bound.
        """
        eb = BYTES[precision]
        flops = 2.0 * m * n * k * count
        splits = k_splits(m, n, k, count, self.compute_units)
        fill = wave_fill(m, n, count * splits, self.compute_units)
        bw = self.memory_bandwidth_gbps * 1e9
        compute = flops / (self.matmul_tflops[precision] * 1e12 * fill) + 2.0 * eb * m * n * count / bw
        if splits > 1:  # the partial tiles, fp32, written and read back to be summed
            compute += 2.0 * 4 * m * n * count * splits / bw
        memory = eb * (m * k + k * n + m * n) * count / bw
        return max(compute, memory)

    def memory_seconds(self, nbytes: float) -> float:
        """Time of a memory-bound kernel that reads and writes ``nbytes`` in total."""
        return nbytes / (self.memory_bandwidth_gbps * 1e9)

    @cached_property
    def _attention_fits(self) -> dict[str, tuple[float, float, float]]:
        return {p: fit_attention(points) for p in PRECISIONS
                if (points := tuple(a for a in self.attention if a.precision == p))}

    def attention_tflops(self, seq_len: int, head_dim: int, precision: str = "bf16") -> float | None:
        """Rate of causal flash attention, or None when the device has no fused kernel.

        ``1 / rate = a + b / seq_len + c / head_dim``: a per-block cost (softmax, masking,
        the causal diagonal) adds to the tensor-core time, and it is amortised over longer
        sequences and larger heads. The fit is not extrapolated towards higher rates: beyond
        the longest measured sequence and the largest measured head the rate is held at its
        edge. A flash kernel's rate saturates once its per-block costs are amortised
        (FlashAttention-2 paper, Fig. 4, A100, causal, d=128: 166 TFLOP/s at 2k, 189 at 8k,
        14% for a fourfold sequence), whereas a ``1/s`` term fitted to two close points keeps
        climbing past them (the H200 file's 2k and 4k points would put 8k at 287 TFLOP/s, 20%
        above 4k). Below the measured range the overhead is real and the fit applies.
        Without points at ``precision``, the other precision's rate scaled as the products scale.
        """
        fits = self._attention_fits
        if not fits:
            return None
        source = precision if precision in fits else next(iter(fits))
        a, b, c = fits[source]
        points = [p for p in self.attention if p.precision == source]
        seq_len = min(seq_len, max(p.seq_len for p in points))
        head_dim = min(head_dim, max(p.head_dim for p in points))
        rate = 1.0 / (a + b / seq_len + c / head_dim)
        return rate * self.matmul_tflops[precision] / self.matmul_tflops[source]


def fit_matmul_tflops(points: tuple[MatmulPoint, ...], memory_bandwidth_gbps: float, launch_us: float,
                      compute_units: int = 1, precision: str = "bf16") -> float:
    """The sustained rate of :meth:`Device.gemm_seconds` that best explains measured products.

    Each product gives ``rate = flops / (fill * (time - 2 * output_bytes / bandwidth))``;
    products within 4 launch times are launch-bound and say nothing about the rate. Median
    over products, because a hot chip runs the same product slower late in a run.
    """
    eb, bw = BYTES[precision], memory_bandwidth_gbps * 1e9
    rates = []
    for p in points:
        if p.precision != precision:
            continue
        flops = 2.0 * p.m * p.n * p.k
        seconds = flops / (p.tflops * 1e12)
        busy = seconds - 2.0 * eb * p.m * p.n / bw
        splits = k_splits(p.m, p.n, p.k, 1, compute_units)
        if splits > 1:
            busy -= 2.0 * 4 * p.m * p.n * splits / bw
        if seconds > 4 * launch_us * 1e-6 and busy > 0.5 * seconds:
            rates.append(flops / busy / wave_fill(p.m, p.n, splits, compute_units) / 1e12)
    if not rates:
        raise ZhiluError("hardware.device.matmul", f"no {precision} product above the launch floor to fit a rate to")
    return median(rates)


def fit_attention(points: tuple[AttentionPoint, ...]) -> tuple[float, float, float]:
    """Least squares of ``1 / rate = a + b / seq_len + c / head_dim`` (fewer terms for fewer points)."""
    rows = [(1.0, 1.0 / p.seq_len, 1.0 / p.head_dim) for p in points]
    ys = [1.0 / p.tflops for p in points]
    distinct = [len({r[i] for r in rows}) > 1 for i in (1, 2)]
    used = [0] + [i + 1 for i, d in enumerate(distinct) if d]
    coef = least_squares([[r[i] for i in used] for r in rows], ys)
    full = [0.0, 0.0, 0.0]
    for i, c in zip(used, coef):
        full[i] = c
    if full[1] < 0 or full[2] < 0:  # a rate that falls with longer sequences is noise: keep the mean
        full = [sum(ys) / len(ys), 0.0, 0.0]
    return full[0], full[1], full[2]


def least_squares(a: list[list[float]], y: list[float]) -> list[float]:
    """Solve the normal equations of a small dense system (Gauss-Jordan)."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * v for r, v in zip(a, y))] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c and m[c][c]:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * z for x, z in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


@dataclass(frozen=True)
class Cluster:
    """``nodes`` nodes of ``devices_per_node`` devices; ``intra`` joins a node, ``inter`` the nodes."""

    name: str
    device: Device
    devices_per_node: int
    intra: Link
    inter: Link
    nodes: int = 1

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    def sized(self, devices: int, devices_per_node: int | None = None) -> Cluster:
        """The same hardware with ``devices`` in all, ``devices_per_node`` to a node."""
        per_node = devices_per_node or self.devices_per_node
        if devices < 1:
            raise ZhiluError("gpus", f"must be a positive integer, got {devices}")
        if per_node < 1:
            raise ZhiluError("gpus_per_node", f"must be a positive integer, got {per_node}")
        per_node = min(per_node, devices)
        if devices % per_node:
            raise ZhiluError("gpus", f"{devices} devices do not fill whole nodes of {per_node}")
        return replace(self, devices_per_node=per_node, nodes=devices // per_node)


# --- presets ---------------------------------------------------------------------------------
# Achieved copy bandwidth = 0.881 x datasheet: the H200 measurement in
# shared/published/h200_ceilings_measured.json copies at 4230 of 4800 GB/s.
COPY_EFFICIENCY = 4230.2 / 4800.0

# H200 bf16 products measured with PyTorch 2.11 (shared/published/h200_ceilings_measured.json).
_H200_MATMUL = tuple(MatmulPoint(m, n, k, t) for m, n, k, t in (
    (256, 256, 256, 1.6), (512, 512, 512, 12.0), (1024, 1024, 1024, 96.7), (2048, 2048, 2048, 695.3),
    (4096, 4096, 4096, 794.1), (8192, 8192, 8192, 802.9), (16384, 16384, 16384, 710.5),
    (16384, 6144, 2048, 648.8), (16384, 16384, 2048, 657.9), (16384, 12288, 4096, 702.3),
    (16384, 32768, 4096, 711.8), (8192, 8192, 8192, 684.5), (4096, 36864, 12288, 730.5),
    (2048, 49152, 12288, 702.5), (4096, 4608, 1536, 562.6)))
_H200_LAUNCH_US = 21.5  # the same file: a 256^3 product, launch-bound, takes 21.5 us from Python
_H200_BW = 4230.2
# The same file's causal SDPA rates count the full score matrix (4*B*H*T^2*D per forward, x3.5
# with backward); the kernel (FlashAttention-2 in PyTorch) executes half of it, hence / 2. The
# result matches FlashAttention-2's published H100 rates (about 180-290 TFLOP/s causal, fwd+bwd).
_HOPPER_ATTENTION = (AttentionPoint(2048, 128, 359.9 / 2), AttentionPoint(4096, 128, 479.1 / 2),
                     AttentionPoint(1024, 64, 209.4 / 2))
# GH100 (H100 SXM and H200: same die, 132 SMs, 700 W): training keeps the chip hot and at its
# power limit, so the sustained rate is the hot one: the repeat of 8192^3 in the H200 file, 684.5
# TFLOP/s, is 713 TFLOP/s of main loop once its output store is taken out (gemm_seconds). Cool,
# the same product ran at 803; ml-engineering's sustained (MSMF) H200 rate is 703-727 TFLOP/s.
_GH100_BF16 = fit_matmul_tflops((MatmulPoint(8192, 8192, 8192, 684.5),), _H200_BW, _H200_LAUNCH_US, 132)
# A100: ml-engineering's MAMF, 271.2 TFLOP/s at 1024x10240x5120, is a burst at the 1410 MHz boost
# clock; under sustained load an A100 holds 1305 MHz at its 400 W limit (the clock NVIDIA quotes
# for A100 HPL Rpeak). Fitted MAMF rate x 1305/1410.
_A100_MAMF = MatmulPoint(1024, 10240, 5120, 271.2)
_A100_BF16 = fit_matmul_tflops((_A100_MAMF,), 2039 * COPY_EFFICIENCY, _H200_LAUNCH_US, 108) * 1305 / 1410
# FlashAttention-2 paper (Dao 2023), Fig. 4, A100 80GB, causal, forward+backward, read from the plot:
# a benchmark at the boost clock, here at the sustained 1305 of 1410 MHz like the products.
_A100_ATTENTION = tuple(AttentionPoint(s, d, t * 1305 / 1410)
                        for s, d, t in ((2048, 128, 166.0), (8192, 128, 189.0), (2048, 64, 145.0)))
# V100 SXM3: 80 SMs x 1024 fp16 FLOP/clock at the ~1.35 GHz it sustains of its 1.53 GHz boost
# (Summit's HPL Rpeak, 200.8 PF for 27648 V100s and their hosts, implies it), at the A100's
# per-clock GEMM efficiency (its MAMF over its boost-clock peak, 0.923).
_V100_FP16 = 80 * 1024 * 1.35e9 / 1e12 * _A100_BF16 / (108 * 2048 * 1.305e9 / 1e12)
# ml-engineering measured the sustained (MSMF) rate of 8 H200s 5 times each, all busy: 40 samples
# spanning 4.5%, a relative standard deviation of 4.5% / 4.32 (the expected range of 40 normals).
_SPREAD = 0.045 / 4.32
# A running NCCL collective holds its channels' thread blocks, one per SM, for as long as it runs
# (over the network too, where they wait on the NIC): NCCL uses up to 32 channels, and a
# full-SM GEMM tile cannot share their SMs. 32 of 108 A100 SMs, of 132 GH100 SMs, of 80 V100 SMs.
_NCCL_SMS = 32
_NVLINK3 = Link("nvlink3", 1.0, 205.0, _NCCL_SMS / 108)  # 8 A100, 300 GB/s a way: nccl-tests busbw 200-210
_NVLINK4 = Link("nvlink4", 1.0, 370.0, _NCCL_SMS / 132)  # 8 H100, 450 GB/s line: ring busbw ~370 (NCCL team)
_NVLINK2 = Link("nvlink2", 1.5, 125.0, _NCCL_SMS / 80)  # DGX-2, 16 V100, 150 GB/s a way: busbw ~125
_HDR = Link("ib-hdr", 5.0, 23.0, _NCCL_SMS / 108)  # a 200 Gb/s HDR InfiniBand NIC per GPU: 25 GB/s, ~23 achieved
_NDR = Link("ib-ndr", 5.0, 46.0, _NCCL_SMS / 132)  # a 400 Gb/s NDR NIC per GPU: 50 GB/s, ~46 achieved
_EDR_DGX2 = Link("ib-edr", 5.0, 5.8, _NCCL_SMS / 80)  # DGX-2: 8 x 100 Gb/s EDR for 16 GPUs, 6.25 GB/s per GPU


def _gpu(name: str, memory_gib: float, bandwidth_gbps: float, power_w: float, peak: tuple[float, float],
         bf16: float, sms: int, attention: tuple[AttentionPoint, ...] = (),
         matmul: tuple[MatmulPoint, ...] = ()) -> Device:
    """A GPU preset; fp32 (CUDA cores, PyTorch's default without TF32) at the same clock as bf16."""
    return Device(name, memory_gib=memory_gib, memory_bandwidth_gbps=bandwidth_gbps * COPY_EFFICIENCY,
                  power_w=power_w, peak_tflops={"bf16": peak[0], "fp32": peak[1]},
                  matmul_tflops={"bf16": bf16, "fp32": peak[1] * bf16 / peak[0]}, attention=attention,
                  matmul=matmul, compute_units=sms, launch_us=_H200_LAUNCH_US, rate_spread=_SPREAD)


PRESETS: dict[str, Cluster] = {
    "a100-40gb": Cluster("a100-40gb", _gpu("NVIDIA A100-SXM4-40GB", 39.4, 1555, 400, (312, 19.5), _A100_BF16, 108,
                                           _A100_ATTENTION), 8, _NVLINK3, _HDR),
    "a100-80gb": Cluster("a100-80gb", _gpu("NVIDIA A100-SXM4-80GB", 79.2, 2039, 400, (312, 19.5), _A100_BF16, 108,
                                           _A100_ATTENTION), 8, _NVLINK3, _HDR),
    "h100-sxm": Cluster("h100-sxm", _gpu("NVIDIA H100 80GB HBM3", 79.1, 3350, 700, (989, 67), _GH100_BF16, 132,
                                         _HOPPER_ATTENTION), 8, _NVLINK4, _NDR),
    "h200": Cluster("h200", _gpu("NVIDIA H200", 139.8, 4800, 700, (989, 67), _GH100_BF16, 132, _HOPPER_ATTENTION,
                                 _H200_MATMUL), 8, _NVLINK4, _NDR),
    "v100-32gb": Cluster("v100-32gb", _gpu("Tesla V100-SXM3-32GB", 31.7, 900, 350, (125, 15.7), _V100_FP16, 80),
                         16, _NVLINK2, _EDR_DGX2),
    # One training process on a few x86-64 cores (AVX2/AVX-512 fp32 FMA; bf16 without AMX is slower
    # than fp32), gloo over shared memory in a host and TCP between hosts. Rough by nature:
    # `zhilu calibrate` measures the machine at hand and writes a hardware file.
    "cpu": Cluster("cpu", Device(
        "x86-64 CPU process", memory_gib=16.0, memory_bandwidth_gbps=10.0, power_w=60.0,
        peak_tflops={"bf16": 0.2, "fp32": 0.2}, matmul_tflops={"bf16": 0.03, "fp32": 0.08},
        compute_units=1, launch_us=10.0, synchronous=True), 2, Link("shm", 30.0, 2.0), Link("tcp", 100.0, 1.0)),
}


def gpu_preset(device_name: str) -> str | None:
    """The preset of the GPU PyTorch names ``device_name`` (e.g. ``NVIDIA H200``), or None."""
    name = device_name.lower()
    for key, c in PRESETS.items():
        if key != "cpu" and name and (c.device.name.lower() in name or name in c.device.name.lower()):
            return key
    return None


def calibrated_path(device_type: str, nproc: int) -> Path:
    """Where ``zhilu calibrate`` keeps this machine's hardware file for ``nproc`` processes on
    ``device_type`` (cpu or cuda): ``$XDG_CACHE_HOME/zhilu`` or ``~/.cache/zhilu``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zhilu"
    return root / f"hardware-{device_type}-{nproc}.toml"


def cluster(name_or_path: str, devices: int | None = None, devices_per_node: int | None = None) -> Cluster:
    """A preset by name or a hardware file by path, sized to ``devices`` if given."""
    base = PRESETS.get(name_or_path)
    if base is None:
        path = Path(name_or_path)
        if path.suffix != ".toml" and not path.exists():
            raise ZhiluError("hardware", f"unknown hardware {name_or_path!r}; valid: {', '.join(PRESETS)}, "
                                         "or the path of a .toml hardware file")
        base = load(path)
    if devices is None:
        return base if devices_per_node is None else base.sized(base.devices, devices_per_node)
    return base.sized(devices, devices_per_node)


# --- hardware files ----------------------------------------------------------------------------

def load(path: str | Path) -> Cluster:
    """Read a hardware file (TOML, the format :func:`dump` writes)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ZhiluError("hardware", f"no such hardware file: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ZhiluError("hardware", f"cannot read {path}: {e}") from None
    return from_dict(data, str(path))


def from_dict(data: dict[str, Any], source: str = "hardware") -> Cluster:
    """Build a :class:`Cluster` from the parsed contents of a hardware file."""
    dev = _table(data, "device")
    links = _table(data, "links")
    matmul = tuple(MatmulPoint(_int(r, "m", "device.matmul"), _int(r, "n", "device.matmul"),
                               _int(r, "k", "device.matmul"), _num(r, "tflops", "device.matmul"),
                               _choice(r, "precision", "device.matmul", PRECISIONS, "bf16"))
                   for r in _rows(dev, "matmul"))
    attention = tuple(AttentionPoint(_int(r, "seq_len", "device.attention"), _int(r, "head_dim", "device.attention"),
                                     _num(r, "tflops", "device.attention"),
                                     _choice(r, "precision", "device.attention", PRECISIONS, "bf16"))
                      for r in _rows(dev, "attention"))
    bandwidth = _num(dev, "memory_bandwidth_gbps", "device")
    launch = _num(dev, "launch_us", "device", default=10.0)
    units = _int(dev, "compute_units", "device", default=1)
    peak = _rates(dev, "peak_tflops")
    sustained = _rates(dev, "matmul_tflops", required=False)
    for p in PRECISIONS:
        if p not in sustained:
            if not any(m.precision == p for m in matmul):
                raise ZhiluError(f"hardware.device.matmul_tflops.{p}", "missing; give the sustained rate or "
                                                                     f"measured {p} products as [[device.matmul]]")
            sustained[p] = fit_matmul_tflops(matmul, bandwidth, launch, units, p)
    device = Device(
        name=str(dev.get("name", source)), memory_gib=_num(dev, "memory_gib", "device"),
        memory_bandwidth_gbps=bandwidth, power_w=_num(dev, "power_w", "device"), peak_tflops=peak,
        matmul_tflops=sustained, attention=attention, matmul=matmul,
        compute_units=units, launch_us=launch,
        rate_spread=_fraction(dev, "rate_spread", "device"), synchronous=_bool(dev, "synchronous", "device"),
        tp_layer_us=_nonnegative(dev, "tp_layer_us", "device"),
        tp_layer_s_per_gb=_nonnegative(dev, "tp_layer_s_per_gb", "device"),
        tp_ends_us=_nonnegative(dev, "tp_ends_us", "device"),
        fsdp_step_us=_nonnegative(dev, "fsdp_step_us", "device"),
        fsdp_s_per_gb=_nonnegative(dev, "fsdp_s_per_gb", "device"))
    return Cluster(str(data.get("name", source)), device, _int(data, "devices_per_node", "", default=1),
                   _link(links, "intra"), _link(links, "inter"))


def to_dict(c: Cluster) -> dict[str, Any]:
    """The contents of a hardware file for ``c`` (its size in nodes is given at plan time)."""
    d = c.device
    device: dict[str, Any] = {
        "name": d.name, "memory_gib": d.memory_gib, "memory_bandwidth_gbps": d.memory_bandwidth_gbps,
        "power_w": d.power_w, "compute_units": d.compute_units, "launch_us": d.launch_us,
        "rate_spread": d.rate_spread, "synchronous": d.synchronous, "tp_layer_us": d.tp_layer_us,
        "tp_layer_s_per_gb": d.tp_layer_s_per_gb, "tp_ends_us": d.tp_ends_us,
        "fsdp_step_us": d.fsdp_step_us, "fsdp_s_per_gb": d.fsdp_s_per_gb, "peak_tflops": dict(d.peak_tflops),
        "matmul_tflops": dict(d.matmul_tflops),
        "matmul": [{"precision": p.precision, "m": p.m, "n": p.n, "k": p.k, "tflops": p.tflops} for p in d.matmul],
        "attention": [{"precision": a.precision, "seq_len": a.seq_len, "head_dim": a.head_dim, "tflops": a.tflops}
                      for a in d.attention]}
    links = {tier: {"name": link.name, "latency_us": link.latency_us, "bandwidth_gbps": link.bandwidth_gbps,
                    "compute_share": link.compute_share} for tier, link in (("intra", c.intra), ("inter", c.inter))}
    return {"name": c.name, "devices_per_node": c.devices_per_node, "device": device, "links": links}


def dump(c: Cluster) -> str:
    """The TOML hardware file that :func:`load` reads back to ``c``."""
    import tomli_w

    return ("# zhilu hardware file. Rates are achieved ones, not datasheet peaks; units and the model\n"
            "# that uses them: docs/perf_model.md. `zhilu calibrate` writes one for this machine.\n"
            + tomli_w.dumps(to_dict(c)))


def save(c: Cluster, path: str | Path) -> None:
    """Write :func:`dump` of ``c`` to ``path`` atomically (its folder made if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump(c))
    os.replace(tmp, path)


def _table(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise ZhiluError(f"hardware.{key}", "missing table; a hardware file needs [device] and [links.intra], "
                                            "[links.inter] (see zhilu.hardware.dump)")
    return v


def _rows(d: dict[str, Any], key: str) -> list[dict[str, Any]]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(r, dict) for r in v):
        raise ZhiluError(f"hardware.device.{key}", "must be an array of tables ([[device.%s]])" % key)
    return v


def _num(d: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    v = d.get(key, default)
    name = f"hardware.{where + '.' if where else ''}{key}"
    if v is None:
        raise ZhiluError(name, "missing; must be a positive number")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ZhiluError(name, f"must be a positive number, got {v!r}")
    return float(v)


def _int(d: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    v = d.get(key, default)
    name = f"hardware.{where + '.' if where else ''}{key}"
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ZhiluError(name, f"must be a positive integer, got {v!r}")
    return v


def _choice(d: dict[str, Any], key: str, where: str, valid: tuple[str, ...], default: str) -> str:
    v = d.get(key, default)
    if v not in valid:
        raise ZhiluError(f"hardware.{where}.{key}", f"must be one of {', '.join(valid)}, got {v!r}")
    return v


def _rates(dev: dict[str, Any], key: str, required: bool = True) -> dict[str, float]:
    table = dev.get(key)
    if table is None and not required:
        return {}
    if not isinstance(table, dict):
        raise ZhiluError(f"hardware.device.{key}", f"missing table; needs {' and '.join(PRECISIONS)} rates")
    unknown = set(table) - set(PRECISIONS)
    if unknown:
        raise ZhiluError(f"hardware.device.{key}", f"unknown precision {sorted(unknown)[0]!r}; valid: "
                                                   f"{', '.join(PRECISIONS)}")
    out = {p: _num(table, p, f"device.{key}") for p in table}
    if required and set(out) != set(PRECISIONS):
        missing = sorted(set(PRECISIONS) - set(out))
        raise ZhiluError(f"hardware.device.{key}.{missing[0]}", "missing; must be a positive number")
    return out


def _link(links: dict[str, Any], tier: str) -> Link:
    v = links.get(tier)
    if not isinstance(v, dict):
        raise ZhiluError(f"hardware.links.{tier}", "missing table with name, latency_us, bandwidth_gbps")
    return Link(str(v.get("name", tier)), _num(v, "latency_us", f"links.{tier}"),
                _num(v, "bandwidth_gbps", f"links.{tier}"), _fraction(v, "compute_share", f"links.{tier}"))


def _nonnegative(d: dict[str, Any], key: str, where: str) -> float:
    v = d.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ZhiluError(f"hardware.{where}.{key}", f"must be a number >= 0, got {v!r}")
    return float(v)


def _bool(d: dict[str, Any], key: str, where: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise ZhiluError(f"hardware.{where}.{key}", f"must be true or false, got {v!r}")
    return v


def _fraction(d: dict[str, Any], key: str, where: str) -> float:
    v = d.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ZhiluError(f"hardware.{where}.{key}", f"must be a number in [0, 1), got {v!r}")
    return float(v)


__all__ = ["AttentionPoint", "BYTES", "COPY_EFFICIENCY", "Cluster", "Device", "Link", "MatmulPoint", "PRECISIONS",
           "PRESETS", "calibrated_path", "cluster", "dump", "fit_attention", "fit_matmul_tflops", "from_dict",
           "gpu_preset", "k_splits", "least_squares", "load", "save",
           "to_dict", "wave_fill"]
