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

- :mod:`zhilu.calibrate.cli`: the command (``add_arguments``, ``run``) and :func:`calibrate`
- :mod:`zhilu.calibrate.probes`: what each process measures (:func:`measure`): products,
  attention, bandwidth, launch time, collectives
- :mod:`zhilu.calibrate.runtime`: zhilu's own tensor-parallel and ZeRO-3 layers, timed whole
- :mod:`zhilu.calibrate.fit`: the hardware file's numbers from the measurements
- :mod:`zhilu.calibrate.timing`, :mod:`zhilu.calibrate.shapes`: the timer and what is measured
"""

from __future__ import annotations

from zhilu.calibrate.cli import add_arguments, calibrate, run
from zhilu.calibrate.fit import fit, fit_link, fsdp_overhead, tensor_parallel_overhead
from zhilu.calibrate.probes import measure

__all__ = ["add_arguments", "calibrate", "fit", "fit_link", "fsdp_overhead", "measure", "run",
           "tensor_parallel_overhead"]
