"""Tensor parallelism (Megatron style) on the mesh's "tp" dimension through DTensor.

Applies the plan a model declares (:class:`zhilu.spec.ModelSpec` ``tp_plan``, and
``sp_plan`` under sequence parallelism) with ``parallelize_module``. The named styles mean:

* ``colwise`` / ``rowwise``: ``ColwiseParallel`` / ``RowwiseParallel``; under sequence
  parallelism a row-wise product reduce-scatters its output along the sequence.
* ``embedding``: the table split by vocabulary (row-wise), its output replicated (or split
  along the sequence under sequence parallelism).
* ``output``: the output projection split by vocabulary with the logits left sharded; the
  loss is then computed on sharded logits under ``loss_parallel``.
* ``output_gather``: split by vocabulary, the logits gathered whole.
* ``sequence_parallel``: ``SequenceParallel`` (norms), under sequence parallelism only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from zhilu.spec import resolve_patterns


def _style(name: str, sequence_parallel: bool) -> ParallelStyle | None:
    between = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        return RowwiseParallel(output_layouts=between)
    if name == "embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if name == "output":
        return ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
    if name == "output_gather":
        return ColwiseParallel(input_layouts=between, output_layouts=Replicate())
    if name == "sequence_parallel":
        return SequenceParallel() if sequence_parallel else None
    raise ValueError(f"unknown tensor-parallel style {name!r}")


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, tp_plan: Mapping[str, Any],
                          sp_plan: Mapping[str, Any] | None, sequence_parallel: bool) -> bool:
    """Shard ``model`` (a whole model or one pipeline stage) in place across ``mesh``.

    Returns whether the model's logits are left sharded (an ``output`` style was applied), so
    that the loss must run under ``loss_parallel``.
    """
    declared = dict(tp_plan)
    if sequence_parallel:
        declared.update(sp_plan or {})
    resolved = resolve_patterns(model, declared)
    styles = {}
    for name, style in resolved.items():
        style = _style(style, sequence_parallel) if isinstance(style, str) else style
        if style is not None:
            styles[name] = style
    if styles:
        parallelize_module(model, mesh, styles)
    return any(style == "output" for style in resolved.values())


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor: a DTensor (a loss under tensor parallelism) made whole."""
    return t.full_tensor() if isinstance(t, DTensor) else t
