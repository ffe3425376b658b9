"""Memory per device: model states by ZeRO stage, activations in flight, temporary buffers.

Mixed precision (``bf16``) keeps per parameter 2 bytes of bf16 weights, 4 of fp32 gradients
and 12 of optimizer state (fp32 master weights, Adam's two moments): 18 bytes, the
accounting of Megatron-LM and of Korthikanti et al. 2022, Fig. 1. ``fp32`` keeps 4 + 4 + 8.
ZeRO (Rajbhandari et al. 2020) partitions over the data-parallel group: stage 1 the
optimizer state, stage 2 also the gradients, stage 3 also the weights; the stage a plan
holds is :attr:`zhilu.perf.data_parallel.Sharding.held` (under zhilu's pipeline, at most 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from zhilu.perf.flops import Transformer

GIB = float(1 << 30)
STATE_BYTES = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}  # weights, gradients, optimizer state per parameter


@dataclass(frozen=True)
class Memory:
    """Bytes per device, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in (("weights", self.weights), ("gradients", self.gradients),
                                        ("optimizer", self.optimizer), ("activations", self.activations),
                                        ("buffers", self.buffers))}


def stage_params(model: Transformer, tp: int, layers_on_stage: int, first: bool, last: bool, pp: int) -> float:
    """Parameters one device of a pipeline rank holds: its layers' share, the embedding on the
    rank of the first stage, the final norm and output layer on that of the last (a tied output
    layer is a second copy unless one rank holds both)."""
    n = layers_on_stage * model.layer_params / tp
    table = model.vocab * model.hidden / tp
    if first:
        n += table
    if last:
        n += model.hidden
        if not model.tied or pp > 1:
            n += table
    return n


def state_bytes(params: float, precision: str, zero: int, dp: int) -> tuple[float, float, float]:
    """Weights, gradients and optimizer state in bytes for ``params`` under ZeRO ``zero`` over ``dp``."""
    w, g, o = STATE_BYTES[precision]
    return (params * w / (dp if zero >= 3 else 1), params * g / (dp if zero >= 2 else 1),
            params * o / (dp if zero >= 1 else 1))


def logits_bytes(model: Transformer, tokens: int, tp: int) -> float:
    """The output layer's logits while the loss is computed and differentiated.

    PyTorch's and Megatron's cross-entropy upcast the bf16 logits to fp32 and keep the fp32
    (log-)softmax; in backward its fp32 gradient and the bf16 result: about 12 bytes per logit.
    """
    return tokens * model.vocab / tp * 12


def zero3_buffers(model: Transformer, tp: int, precision: str, grad_bytes: int) -> float:
    """Unsharded copies under ZeRO-3: two blocks of weights (one in use, one prefetched) and one
    block of gradients waiting for its reduce-scatter; the largest block is a layer or the
    vocabulary table (embedding, output layer)."""
    w = STATE_BYTES[precision][0]
    return max(model.layer_params, model.vocab * model.hidden) / tp * (2 * w + grad_bytes)
