"""What ``zhilu calibrate`` measures: the shapes of its products, attention, layers and transfers."""

from __future__ import annotations

from zhilu.models.presets import GPTConfig

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
_CPU_SIZES = [4 ** i for i in range(6, 13)]  # 4 KiB .. 16 MiB
_GPU_SIZES = [4 ** i for i in range(8, 15)]  # 64 KiB .. 256 MiB


def _layer_config(shape: dict[str, int], layers: int) -> GPTConfig:
    return GPTConfig(n_layers=layers, hidden=shape["hidden"], n_heads=shape["heads"], ffn_hidden=shape["ffn"],
                     vocab_size=256, max_seq_len=shape["seq_len"])
