"""Devices, links and clusters: what the performance model needs to know about the hardware.

A :class:`Device` is described by its *achieved* rates, not its datasheet: the sustained
tensor-core rate of a large matrix product, the bandwidth a copy reaches, the rate of a
causal flash-attention kernel by sequence length and head size (:mod:`zhilu.perf.rates`).
A :class:`Cluster` is a device x devices per node x nodes, joined by two :class:`Link` tiers
(inside a node and between nodes). Presets: :mod:`zhilu.perf.presets`; hardware files:
:mod:`zhilu.perf.hardware_file`.

Units: rates in TFLOP/s, bandwidths in GB/s (10**9 bytes), memory in GiB, latency in us.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from statistics import NormalDist

from zhilu.errors import ZhiluError
from zhilu.perf.rates import BYTES, AttentionPoint, MatmulPoint, fit_attention, k_splits, wave_fill
from zhilu.plan import PRECISIONS


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
