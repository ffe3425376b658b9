"""Data parallelism: DDP replicas (zero=0) or ZeRO stages 1-3 through FSDP2 ``fully_shard``.

With tensor or pipeline parallelism, zero=0 replicates with FSDP2's ``replicate``
(gradients all-reduced over the dp dimension): DDP takes no DTensor parameters, and DDP
around a pipeline stage can hang when a rank runs as many micro-batches as stages. With
model averaging (``avg_every``) the replicas are left alone: they synchronise by averaging
parameters, not gradients (:mod:`zhilu.parallel.local_sgd`).

ZeRO stages map onto FSDP2 as follows (optimizer states are sharded in every stage, since
the optimizer steps on the local shards):

* zero=1: parameters all-gathered once per step and kept through backward; during gradient
  accumulation the full gradients stay local and are reduce-scattered only after the last
  micro-batch.
* zero=2: as zero=1, but gradients are reduce-scattered after every micro-batch, so only
  sharded gradients are held.
* zero=3: parameters are resharded after forward and all-gathered again in backward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from zhilu.parallel.mesh import ParallelEnv
from zhilu.plan import Plan


def apply_data_parallel(model: nn.Module, blocks: list[nn.Module], plan: Plan, env: ParallelEnv) -> nn.Module:
    """Wrap ``model`` for the plan's dp axis; a no-op when dp == 1. Under FSDP2 each of
    ``blocks`` is its own unit and the rest of the model is the root's."""
    if plan.dp == 1 or (plan.avg_every and "sync" not in env.groups):
        return model
    if plan.zero == 0 and (plan.tp > 1 or plan.pp > 1):
        from torch.distributed._composable.replicate_with_fsdp import replicate

        return replicate(model, mesh=env.mesh["dp"])  # type: ignore[index]
    if plan.zero == 0:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # Buffers start identical on every rank (initialised from the seed): no broadcast.
        no_buffer_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        group = env.groups.get("sync", env.dp_group)  # hybrid averaging: DDP within this rank's group
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group, **no_buffer_sync)
    mesh = env.mesh["dp"]  # type: ignore[index]
    on_cuda = env.device.type == "cuda"  # gather bf16 parameters, reduce fp32 gradients
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_cuda else MixedPrecisionPolicy()
    reshard = plan.zero == 3
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model


def on_bucket_launch(model: nn.Module, launched: Callable[[], None], done: Callable[[], None] | None = None) -> None:
    """Call ``launched`` as DDP launches each gradient bucket's all-reduce and ``done`` (if
    given) as it completes, before DDP reads the result. The all-reduce is DDP's own: gradients
    divided by the group size, then summed. Nothing happens to a model that is not DDP."""
    if not isinstance(model, DistributedDataParallel):
        return
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(group, bucket):  # unannotated: DDP checks annotations, which are strings in this module
        launched()
        future = allreduce_hook(group, bucket)
        if done is None:
            return future

        def finish(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            done()
            return f.value()

        return future.then(finish)

    model.register_comm_hook(model.process_group, hook)


def settle_buckets(model: nn.Module, backward: Callable[[], None]) -> None:
    """Give a DDP model that resumes mid-run the gradient buckets the uninterrupted run had.

    DDP puts every gradient in one bucket for the first backward of a process, then lays its
    buckets out in the order gradients became ready. A gradient's place in its bucket decides
    the order in which the all-reduce adds the ranks' values, so with more than two ranks a
    resumed process's first step would round differently. ``backward`` (a forward and
    backward whose gradients are then dropped) lets DDP lay the buckets out first."""
    if not isinstance(model, DistributedDataParallel):
        return
    rng = torch.get_rng_state()
    backward()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, plan: Plan, last_micro_batch: bool) -> Iterator[None]:
    """Context for one micro-batch's backward: defer gradient reduction until the last one
    where the plan allows it (DDP ``no_sync``; FSDP2 zero=1 keeps full gradients locally)."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule) and plan.zero == 1:
        model.set_requires_gradient_sync(last_micro_batch)
        model.set_reshard_after_backward(last_micro_batch)
    yield


def reshard(model: nn.Module) -> None:
    """Free parameters that a forward without backward (evaluation) left all-gathered under
    zero=1/2, so that the model's parameters are the optimizer's shards again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
