"""MFU, the one definition: model FLOPs per second over the devices' peak.

Model FLOPs count the work of the model itself, forward and backward, without what
recomputation adds; HFU (hardware FLOPs utilisation, beside MFU in metrics.jsonl and
summary.json) is MFU times the FLOPs with recomputation over those without, both counted by
``torch.utils.flop_counter.FlopCounterMode`` (``zhilu.training.metrics.hardware_flops_ratio``).
The peak is the device's dense rate for the precision it trains in, from the hardware
preset's datasheet or from ``zhilu calibrate``; ``zhilu train``, ``zhilu plan``,
``metrics.jsonl`` and ``summary.json`` all report this number.
Pure Python.
"""

from __future__ import annotations


def mfu(flops_per_token: float, tokens_per_s: float, devices: int, peak_tflops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1] for ``devices`` devices of ``peak_tflops_per_device``."""
    if devices < 1 or peak_tflops_per_device <= 0:
        raise ValueError(f"mfu needs devices >= 1 and a positive peak, got {devices} and {peak_tflops_per_device}")
    return flops_per_token * tokens_per_s / (devices * peak_tflops_per_device * 1e12)
