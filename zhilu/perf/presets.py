"""Hardware presets: A100 40/80 GB, H100 SXM, H200, V100 32 GB and a CPU process, and which one a GPU is.

Each constant names its source. Pure Python.
"""

from __future__ import annotations

from zhilu.perf.device import Cluster, Device, Link
from zhilu.perf.rates import AttentionPoint, MatmulPoint, fit_matmul_tflops

# Achieved copy bandwidth = 0.881 x datasheet: the H200 measurement in
# benchmarks/published/h200_ceilings_measured.json copies at 4230 of 4800 GB/s.
COPY_EFFICIENCY = 4230.2 / 4800.0

# H200 bf16 products measured with PyTorch 2.11 (benchmarks/published/h200_ceilings_measured.json).
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
