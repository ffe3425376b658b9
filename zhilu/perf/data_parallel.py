"""Data parallelism in a step: what ZeRO holds and what its traffic adds, as the software runs it.

:func:`sharding` says what a plan's data parallelism does in one step (:class:`Sharding`);
memory (:func:`zhilu.perf.memory.state_bytes` at ``Sharding.held``) and time
(:class:`DataParallel`) both read it, so a plan is sized and timed for the same behaviour.

zhilu's runtime (FSDP2 ``fully_shard`` per block and on the root, ``reshard_after_forward``
for ZeRO-3 only): ZeRO-1 gathers the weights once per step and reduce-scatters the gradients
after the last micro-batch; ZeRO-2 gathers and reduce-scatters for every micro-batch;
ZeRO-3 gathers each layer in forward and again in backward and reduce-scatters it, every
micro-batch. Under ``torch.distributed.pipelining`` (``Software.torch_pipelining``) every
backward turns gradient sync and resharding after backward off and the stage reduces its
gradients once, after its last backward (``PipelineStage.perform_reduce_grad``): ZeRO-1 and
ZeRO-2 both gather once and hold the full weights and gradients; ZeRO-3 reshards each layer
after its forward and gathers it again for the backward that follows, ``m + 1`` gathers a
step, and at its peak (the end of a backward) holds as much as ZeRO-1. The root unit
(embedding, final norm, output layer) stays gathered from forward to backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhilu.perf.comm import collective_seconds
from zhilu.perf.device import Cluster, Device
from zhilu.perf.flops import Transformer
from zhilu.perf.layer import LayerCost
from zhilu.perf.rates import BYTES
from zhilu.perf.software import Software
from zhilu.plan import Plan


@dataclass(frozen=True)
class Sharding:
    """What a plan's data parallelism holds and moves in one step.

    ``held``: the ZeRO stage whose model states the step holds at its peak (the ``zero`` of
    :func:`zhilu.perf.memory.state_bytes`). ``layer_gathers``: all-gathers of each layer per
    micro-batch (ZeRO-3: 2; under the pipeline: 1, for the backward). ``layer_reduces``: each
    layer's gradients reduce-scattered every micro-batch (ZeRO-3). ``passes``: reductions of the
    whole stage's gradients per step, each with a gather of its weights under ZeRO >= 1.
    ``after_backward``: those reductions wait for the last backward, with nothing to hide under.
    ``group``: the replicas a reduction spans (0: all ``dp``; hybrid model averaging: each group's).
    """

    held: int
    layer_gathers: int = 0
    layer_reduces: bool = False
    passes: int = 0
    after_backward: bool = False
    group: int = 0


def sharding(plan: Plan, software: Software) -> Sharding:
    """What ``plan``'s data parallelism does in a step under ``software`` (see the module docstring)."""
    if plan.dp == 1 or (plan.avg_every and not plan.avg_groups):  # none, or replicas averaged (zhilu.perf.job)
        return Sharding(0)
    if plan.avg_every:  # hybrid model averaging: DDP within each group, groups averaged (zhilu.perf.job)
        return Sharding(0, passes=1, group=plan.dp // plan.avg_groups)
    if software.torch_pipelining and plan.pp > 1:
        return Sharding(min(plan.zero, 1), layer_gathers=1 if plan.zero == 3 else 0, passes=1, after_backward=True)
    if plan.zero == 3:
        return Sharding(3, layer_gathers=2, layer_reduces=True)
    return Sharding(plan.zero, passes=plan.mb if plan.zero == 2 else 1)


class DataParallel:
    """The exposed time of a plan's gradient and parameter traffic, per layer and per step."""

    def __init__(self, model: Transformer, cluster: Cluster, device: Device, software: Software) -> None:
        self.model, self.cluster, self.device, self.software = model, cluster, device, software

    def _grad_bytes(self, precision: str) -> int:
        return self.software.grad_reduce_bytes if precision == "bf16" else 4

    def layer_seconds(self, plan: Plan, s: Sharding, layer: LayerCost, dp_per_node: int,
                      share: float) -> tuple[float, float, float]:
        """Per-layer traffic (ZeRO-3): per layer and micro-batch, and once per micro-batch on a
        stage without and with the embedding.

        Each layer's weights are all-gathered in forward and again in backward and its gradients
        reduce-scattered, every micro-batch; prefetch hides what the neighbouring layer's compute
        covers, the first gather and the last reduce-scatter excepted. On the stage that holds the
        embedding those two are the embedding table's: it runs first, so its gather has no compute
        to hide under, and its gradient is the last one backward produces, so its reduce-scatter
        has none either (FSDP1 and FSDP2 alike; where the output layer is in the same unit, as in
        torchtitan's root module until 2025, both tables). FSDP2 keeps the root unit gathered
        from forward to backward. FSDP also copies every gathered buffer out into the weights
        and the gradients in, cast to the reduce type, on the compute stream. Under the pipeline
        one gather per layer and micro-batch, prefetched under the backward of the layer after it.
        """
        if not s.layer_gathers:
            return 0.0, 0.0, 0.0
        c, eb, grad_bytes = self.cluster, BYTES[plan.precision], self._grad_bytes(plan.precision)
        lp = self.model.layer_params / plan.tp
        ag = collective_seconds("all_gather", lp * eb, plan.dp, dp_per_node, c)
        rs = collective_seconds("reduce_scatter", lp * grad_bytes, plan.dp, dp_per_node, c) if s.layer_reduces else 0.0
        reduces = 1 if s.layer_reduces else 0
        # copying out each gathered buffer (read + write) and the gradients in, cast to the reduce type
        copies = self.device.memory_seconds(lp * (2 * eb * s.layer_gathers + (eb + grad_bytes) * reduces))
        copies += (s.layer_gathers + reduces) * self.fsdp_wait(lp * eb, 1, plan.dp)
        backward = layer.compute - layer.forward + layer.recompute
        if not s.layer_reduces:  # under the pipeline: the backward's gather alone
            if not self.overlaps(plan):
                return copies + ag, 0.0, 0.0
            exposed = max(0.0, ag - backward)
            return copies + exposed + (ag - exposed) * share, 0.0, 0.0
        table = self.model.vocab * self.model.hidden / plan.tp
        if self.software.fsdp_output_with_embedding and plan.pp == 1 and not self.model.tied:
            table *= 2
        embedding = (collective_seconds("all_gather", table * eb, plan.dp, dp_per_node, c)
                     + collective_seconds("reduce_scatter", table * grad_bytes, plan.dp, dp_per_node, c))
        embedding += 2 * self.fsdp_wait(table * eb, 1, plan.dp)
        if not self.overlaps(plan):
            return copies + 2 * ag + rs, 0.0, embedding
        exposed = max(0.0, ag - layer.forward) + max(0.0, ag + rs - backward)
        return copies + exposed + (2 * ag + rs - exposed) * share, ag + rs, embedding

    def fsdp_wait(self, nbytes: float, units: int, dp: int) -> float:
        """What one collective over each of ``units`` FSDP units (``nbytes`` of weights in all)
        takes beyond the link model (``Device.fsdp_step_us``, ``fsdp_s_per_gb``)."""
        d = self.device
        return (dp - 1) * (units * d.fsdp_step_us * 1e-6 + d.fsdp_s_per_gb * nbytes / 1e9)

    def overlaps(self, plan: Plan) -> bool:
        """Whether data-parallel traffic runs under compute. DDP's all-reduce runs on the process
        group's own thread, on any device; FSDP overlaps through device streams, which a CPU
        does not have, so there it waits for each gather and reduce-scatter."""
        return self.software.dp_overlap and not (self.device.synchronous and plan.zero >= 1)

    def step_seconds(self, plan: Plan, s: Sharding, weights: float, layer: LayerCost, layers: int,
                     dp_per_node: int, share: float) -> float:
        """Exposed traffic of the whole stage's gradients and weights (ZeRO-3's per layer is
        :meth:`layer_seconds`): the gradients' all-reduce (reduce-scatter with ZeRO >= 1) of the
        stage with the most ``weights``, and the weights' all-gather under ZeRO >= 1, ``passes``
        times. Overlapped, the gradients hide under the last micro-batch's backward (all but the
        last bucket) unless they wait for it (``after_backward``), and the gather under the first
        forward of the ``layers`` of the slowest stage."""
        dp = s.group or plan.dp
        if not s.passes or dp == 1:
            return 0.0
        c, eb, grad_bytes = self.cluster, BYTES[plan.precision], self._grad_bytes(plan.precision)
        kind = "all_reduce" if plan.zero == 0 else "reduce_scatter"
        grads = s.passes * collective_seconds(kind, weights * grad_bytes, dp, dp_per_node, c)
        gather = s.passes * collective_seconds("all_gather", weights * eb, dp, dp_per_node, c) if plan.zero else 0.0
        # FSDP's per-unit collectives (the layers' and the root's): a gather and a reduce-scatter
        fsdp = 2 * s.passes * self.fsdp_wait(weights * eb, layers + 1, dp) if plan.zero else 0.0
        if not self.overlaps(plan):
            return grads + gather + fsdp
        sw = self.software
        if sw.bucket_params:
            params = min(weights, max(sw.bucket_params, sw.bucket_params_per_dp * dp))
            grad_bucket, param_bucket = params * grad_bytes, params * eb
        else:
            grad_bucket = param_bucket = sw.bucket_mb * 1e6
        if s.after_backward:
            exposed = grads
        else:
            backward = layers * (layer.compute - layer.forward + layer.recompute)
            exposed = max(grads - backward,
                          collective_seconds(kind, min(grad_bucket, weights * grad_bytes), dp, dp_per_node, c))
        if gather:
            exposed += max(gather - layers * layer.forward,
                           collective_seconds("all_gather", min(param_bucket, weights * eb), dp, dp_per_node, c))
        return exposed + (grads + gather - exposed) * share + fsdp
