"""Measured rates of a device and the fits to them: matrix products and flash attention.

A product ``[m, k] @ [k, n]`` runs in whole waves of output tiles (:func:`wave_fill`), its
reduction split when its tiles leave units idle (:func:`k_splits`); :func:`fit_matmul_tflops`
finds the sustained rate that explains measured products (:class:`MatmulPoint`), and
:func:`fit_attention` the per-block costs of causal flash attention (:class:`AttentionPoint`).
Pure Python. Units: rates in TFLOP/s, bandwidths in GB/s (10**9 bytes), latency in us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

from zhilu.errors import ZhiluError

BYTES = {"bf16": 2, "fp32": 4}  # bytes per element of each precision (zhilu.plan.PRECISIONS)
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
