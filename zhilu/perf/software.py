"""What the training software does, as far as time and memory go: named stacks.

:data:`STACKS` holds the profiles ``zhilu plan --software NAME`` selects: ``zhilu`` (zhilu's
own runtime, the default), ``megatron`` (Megatron-Core) and its older ``megatron-lm-2020`` /
``megatron-lm-2022``, ``deepspeed`` (Megatron-DeepSpeed), ``torchtitan`` and
``torchtitan-compile``, ``fsdp`` (PyTorch FSDP2 in eager mode) and ``llama3`` (Meta's Llama 3
stack). ``benchmarks/published.py`` predicts each source with its stack's name. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from zhilu.errors import ZhiluError

# Optimizer step, bytes per local parameter: fused Adam reads weight, gradient and two moments
# in fp32 and writes three (28), the gradient norm for clipping reads the gradients (4), zeroing
# them writes (4); mixed precision then casts the fp32 master to the bf16 weight (6).
OPTIMIZER_BYTES = {"bf16": 42, "fp32": 36}
# PyTorch's default (foreach, not fused) AdamW runs one multi-tensor kernel per op over the fp32
# shards (torch/optim/adamw.py, _multi_tensor_adamw): weight decay mul_ (r4 w4), lerp_ of the
# first moment (r8 w4), mul_ and addcmul_ of the second (r4 w4, r8 w4), sqrt, div_, add_ eps
# (r4 w4 each, into a temporary), addcdiv_ into the weight (r12 w4): 80 bytes; clip_grad_norm_
# (foreach) reads the gradients for the norm and scales them (r4, r4 w4): 12. FSDP2's sharded
# weights are the fp32 master, cast to bf16 by its all-gather, so no cast here.
FOREACH_ADAMW_BYTES = 92


@dataclass(frozen=True)
class Software:
    """What the training software does, as far as time and memory go.

    ``fused_kernels``: Megatron/Transformer-Engine kernels or torch.compile (else eager
    PyTorch, one kernel per op). ``flash_attention``: a fused causal attention kernel where
    the device has one. ``selective``: what recompute mode ``selective`` recomputes:
    ``attention`` (the attention core, Korthikanti et al. 2022), ``ops`` (PyTorch's per-op
    policy as in torchtitan: elementwise ops and every second product), ``elementwise``
    (zhilu's: every product and attention kept, the elementwise ops recomputed) or
    ``alternate`` (every second layer in full). ``*_overlap``: tensor-parallel collectives run under the
    products (Megatron-Core, async TP), gradient/parameter traffic under backward/forward
    (DDP buckets, FSDP prefetch), pipeline transfers under compute. ``fused_projections``:
    q, k, v as one product and gate, up as one (Megatron's ``linear_qkv``, ``linear_fc1``),
    else one product per weight (torchtitan's and zhilu's Llama). ``foreach_adamw``: PyTorch's
    default multi-tensor AdamW instead of a fused one. Buckets, FSDP units, pipelines and how
    their layers are split: see the fields.
    """

    name: str
    fused_kernels: bool = False
    flash_attention: bool = True
    selective: str = "attention"
    tp_overlap: bool = False
    dp_overlap: bool = True
    pp_overlap: bool = False
    grad_reduce_bytes: int = 4  # gradients are reduced in fp32 (2: in bf16/fp16)
    p2p_scatter_gather: bool = False  # pipeline sends 1/tp of an activation and all-gathers it (Megatron-LM)
    bucket_mb: float = 25.0  # PyTorch DDP's bucket_cap_mb: the last bucket's reduction is exposed
    # Buckets counted in parameters instead, max(bucket_params, bucket_params_per_dp * dp) of them
    # (Megatron-Core's DistributedDataParallel); 0: bucket_mb applies.
    bucket_params: int = 0
    bucket_params_per_dp: int = 0
    # FSDP: the output layer shares the embedding's unit (torchtitan until 2025 wraps both in the
    # root module), so the first gather and the last reduce-scatter carry both tables
    fsdp_output_with_embedding: bool = False
    fused_projections: bool = False  # q, k, v in one product and gate, up in one (Megatron); else one per weight
    foreach_adamw: bool = False  # PyTorch's default multi-tensor AdamW (FOREACH_ADAMW_BYTES), not a fused kernel
    # Pipeline stages run by torch.distributed.pipelining (zhilu's runtime): every micro-batch's
    # backward sets FSDP's gradient sync and resharding after backward off, and the stage reduces
    # its gradients after the last backward (PipelineStage.perform_reduce_grad), with no compute
    # left to hide under. ZeRO-1/2 gather the stage's weights once per step and hold them and the
    # full gradients; ZeRO-3 also reshards each layer after its forward, so it gathers every layer
    # again for each micro-batch (m + 1 gathers a step) while holding as much as ZeRO-1 at its peak.
    torch_pipelining: bool = False
    # Layers per pipeline stage: zhilu.plan.stage_layers (the embedding and the output layer each
    # count as one layer), "even" (Megatron-LM: layers / stages on every stage, which must divide) or
    # "balanced" (DeepSpeed: as even as they go, the first stages taking one more)
    stage_split: str = "zhilu"
    # A tied output layer may sit on another pipeline stage than the embedding (Megatron-LM keeps
    # a copy there and all-reduces the two gradients); zhilu's runtime refuses such a plan.
    ties_across_stages: bool = True
    # What the stack can run at all (the search offers nothing else, and refuses it pinned): the
    # highest ZeRO stage, and beside pipeline parallelism; sequence parallelism; the interleaved
    # schedule; the recompute modes.
    max_zero: int = 3
    pipeline_max_zero: int = 3
    sequence_parallel: bool = True
    interleaved: bool = True
    recomputes: tuple[str, ...] = ("none", "selective", "full")


# zhilu's own runtime: eager PyTorch, SDPA flash attention, DDP buckets and FSDP2 prefetch
# overlapped, DTensor tensor parallelism without overlap, torch.distributed.pipelining,
# selective recompute of the elementwise ops (zhilu/parallel/recompute.py), fused AdamW on GPUs.
ZHILU = Software("zhilu", selective="elementwise", torch_pipelining=True, ties_across_stages=False)

# Megatron-LM 2020 (Shoeybi et al.): fused kernels (scale-mask-softmax, bias-GeLU, Apex layer
# norm), explicit attention with dropout, fp16 gradients all-reduced after backward by its
# "local" DDP (--DDP-impl local, the default then: no overlap). It had none of what came later:
# the interleaved schedule (Narayanan et al. 2021), sequence parallelism and selective recompute
# (Korthikanti et al. 2022), the distributed optimizer (ZeRO-1, 2022); activation checkpointing
# was whole layers.
MEGATRON_2020 = Software("megatron-lm-2020", fused_kernels=True, flash_attention=False, dp_overlap=False,
                         grad_reduce_bytes=2, p2p_scatter_gather=True, fused_projections=True, stage_split="even",
                         max_zero=0, sequence_parallel=False, interleaved=False, recomputes=("none", "full"))
# Megatron-LM 2022 (Korthikanti et al.): the same kernels, fp32 gradient accumulation, blocking
# pipeline transfers that send 1/tp of an activation and all-gather it over NVLink (its default
# scatter-gather optimisation). Its optimizer shards at most the optimizer state (the
# distributed optimizer, ZeRO-1); Megatron has no ZeRO-2/3.
MEGATRON_2022 = Software("megatron-lm-2022", fused_kernels=True, flash_attention=False, dp_overlap=False,
                         p2p_scatter_gather=True, fused_projections=True, stage_split="even", max_zero=1)
# Megatron-Core r0.8 (2024): Transformer Engine kernels and fused attention, and "DP/TP/PP
# communication overlap on" (its README). Its DistributedDataParallel groups gradients in buckets of
# max(40M, 1M x dp) parameters (megatron/core/distributed/distributed_data_parallel.py, bucket_size).
MEGATRON_CORE = Software("megatron", fused_kernels=True, tp_overlap=True, pp_overlap=True, fused_projections=True,
                         bucket_params=40_000_000, bucket_params_per_dp=1_000_000, stage_split="even", max_zero=1)
# Megatron-DeepSpeed (BigScience's fork, 2022, which trained BLOOM): Megatron-LM's fused kernels
# and explicit attention, DeepSpeed's PipelineEngine (1F1B, blocking transfers of whole activations)
# and ZeRO-1 over data parallelism, fp16 gradients all-reduced once the last micro-batch is done
# (PipelineEngine's ReduceGrads instruction ends the schedule: no overlap). Its stages hold
# ceil(layers / stages) transformer layers at most, as both its "uniform" and its
# "type:transformer" partition methods give for equal layers; taken as the uniform split. Its
# PipelineEngine refuses ZeRO-2/3 (runtime/pipe/engine.py asserts a stage below gradient
# partitioning); the fork had neither Megatron's sequence parallelism nor an interleaved
# schedule, and checkpointed whole layers.
DEEPSPEED = Software("deepspeed", fused_kernels=True, flash_attention=False, dp_overlap=False, grad_reduce_bytes=2,
                     fused_projections=True, stage_split="balanced", pipeline_max_zero=1, sequence_parallel=False,
                     interleaved=False, recomputes=("none", "full"))
# PyTorch FSDP2 in eager mode, as a user's own loop runs it: SDPA flash attention, prefetch under
# compute, gradients reduced in fp32, PyTorch's default (foreach) AdamW, one FSDP unit a layer.
FSDP = Software("fsdp", foreach_adamw=True)
# torchtitan (2024): FSDP2 as above; "selective op" is PyTorch's per-op policy. Its optimizer is
# AdamW with foreach=True (job config optimizer.fused defaults to False). FSDP2 units: each layer,
# and the root module (embedding, final norm, output layer: apply_fsdp, fully_shard(model, ...)).
TORCHTITAN = replace(FSDP, name="torchtitan", selective="ops", fsdp_output_with_embedding=True)
TORCHTITAN_COMPILE = replace(TORCHTITAN, name="torchtitan-compile", fused_kernels=True)  # compile fuses elementwise ops
# Llama 3 (Meta 2024): 4D parallelism with its own fused kernels, asynchronous pipeline
# transfers and overlapped FSDP-style data parallelism (paper, Sec. 3.3).
LLAMA3 = Software("llama3", fused_kernels=True, pp_overlap=True, fused_projections=True)

STACKS = {sw.name: sw for sw in (ZHILU, MEGATRON_CORE, MEGATRON_2020, MEGATRON_2022, DEEPSPEED, TORCHTITAN,
                                 TORCHTITAN_COMPILE, FSDP, LLAMA3)}


def stack(name: str) -> Software:
    """The profile called ``name``; an unknown name is a :class:`ZhiluError` listing the known ones."""
    if name not in STACKS:
        raise ZhiluError("software", f"unknown software {name!r}; valid: {', '.join(STACKS)}")
    return STACKS[name]
