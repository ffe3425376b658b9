"""The GPT's whole tensor-parallel plan, which ``zhilu.parallel`` applies through DTensor.

Megatron's layout: q/k/v and gate/up column-wise, the attention output and down row-wise, so
each block has one all-reduce in attention and one in the MLP (heads split across ranks).
The embedding is split by vocabulary and so is the output projection, whose logits stay
sharded: the loss is computed on them under ``loss_parallel``. With sequence parallelism
the norms and the residual stream are split along the sequence between the tensor-parallel
regions, and each region gathers its input once, at the attention and the MLP.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput

TP_PLAN: dict[str, str] = {
    "tok_embeddings": "embedding",
    "layers.*.attention.wq": "colwise",
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
    "output": "output",
}

SP_PLAN: dict[str, object] = {
    "norm": "sequence_parallel",
    "layers.*.attention_norm": "sequence_parallel",
    "layers.*.ffn_norm": "sequence_parallel",
    # attention(x, cos, sin, cache): gather x along the sequence once for q, k and v
    "layers.*.attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                             desired_input_layouts=(Replicate(), None, None, None)),
    "layers.*.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
}
