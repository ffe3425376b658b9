"""The hardware the performance model knows, under one name (each name is defined where noted).

- :mod:`zhilu.perf.rates`: ``BYTES``, ``MatmulPoint``, ``AttentionPoint``, the GEMM tiling
  (``wave_fill``, ``k_splits``) and the fits (``fit_matmul_tflops``, ``fit_attention``,
  ``least_squares``)
- :mod:`zhilu.perf.device`: ``Device``, ``Link``, ``Cluster``
- :mod:`zhilu.perf.presets`: ``PRESETS``, ``COPY_EFFICIENCY``, ``gpu_preset``
- :mod:`zhilu.perf.hardware_file`: ``cluster`` (a preset or a file), ``load``, ``from_dict``,
  ``to_dict``, ``dump``, ``save``, ``calibrated_path``
- :mod:`zhilu.plan`: ``PRECISIONS``

Units: rates in TFLOP/s, bandwidths in GB/s (10**9 bytes), memory in GiB, latency in us.
"""

from __future__ import annotations

from zhilu.perf.device import Cluster, Device, Link
from zhilu.perf.hardware_file import calibrated_path, cluster, dump, from_dict, load, save, to_dict
from zhilu.perf.presets import COPY_EFFICIENCY, PRESETS, gpu_preset
from zhilu.perf.rates import (BYTES, AttentionPoint, MatmulPoint, fit_attention, fit_matmul_tflops, k_splits,
                              least_squares, wave_fill)
from zhilu.plan import PRECISIONS

__all__ = ["AttentionPoint", "BYTES", "COPY_EFFICIENCY", "Cluster", "Device", "Link", "MatmulPoint", "PRECISIONS",
           "PRESETS", "calibrated_path", "cluster", "dump", "fit_attention", "fit_matmul_tflops", "from_dict",
           "gpu_preset", "k_splits", "least_squares", "load", "save", "to_dict", "wave_fill"]
