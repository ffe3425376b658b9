"""Tensor parallelism (Megatron style) on the mesh's "tp" dimension through DTensor.

The model declares each projection's style (``GPT.TP_PLAN``: q/k/v and gate/up column-wise,
attention output and down row-wise); this file turns it into ``parallelize_module`` plans.
The embedding is split by vocabulary (row-wise) and the output projection by vocabulary
(column-wise) with logits left sharded, so the loss is computed on sharded logits under
``loss_parallel``. With sequence parallelism (``sp=true``) the norms and the residual
stream are split along the sequence between the tensor-parallel regions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a GPT or one pipeline stage of it) in place across ``mesh``."""
    between = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, mesh, top)
    for block in model.layers.values():
        plan: dict[str, object] = {name: _STYLES[style]() for name, style in model.TP_PLAN.items()}
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
            plan.update({name: RowwiseParallel(output_layouts=Shard(1))
                         for name, style in model.TP_PLAN.items() if style == "rowwise"})
        parallelize_module(block, mesh, plan)


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor: a DTensor (a loss under tensor parallelism) made whole."""
    return t.full_tensor() if isinstance(t, DTensor) else t
