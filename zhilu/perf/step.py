"""Time and memory of one training step of a plan: the analytic model.

Per micro-batch and device, each layer costs its forward and backward kernels (matrix
products at the device's achieved rate for their shape, attention, memory-bound
elementwise kernels), what its recompute mode runs again, and the tensor-parallel
collectives that are not hidden. Stages add the embedding or the output layer and the
pipeline transfers; :func:`zhilu.perf.pipeline.pipeline_seconds` turns stage times into the
pipeline's time with its bubble; the data-parallel gradient and parameter traffic adds
what backward and forward cannot hide; the optimizer step closes the step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from zhilu.errors import ZhiluError
from zhilu.hardware import BYTES, PRECISIONS, Cluster
from zhilu.perf.comm import collective_seconds, members_per_node, p2p_seconds
from zhilu.perf.flops import Transformer
from zhilu.perf.memory import GIB, Memory, logits_bytes, stage_params, state_bytes, zero3_buffers
from zhilu.perf.pipeline import SCHEDULES, in_flight, pipeline_seconds, stage_layers

RECOMPUTE = ("none", "selective", "full")
BREAKDOWN = ("compute", "recompute", "tp_comm", "pp_comm", "dp_comm_exposed", "bubble", "optimizer", "other")
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
CROSS_ENTROPY_BYTES = 48  # per logit, forward and backward (see _end_costs)


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
    default multi-tensor AdamW instead of a fused one. Buckets and FSDP units: see the fields.
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
    # Pipeline stages under FSDP gather their weights once per step and reduce-scatter the
    # gradients after the last micro-batch, whatever the ZeRO stage (torch.distributed.pipelining)
    pipeline_unshards_once: bool = False


# zhilu's own runtime: eager PyTorch, SDPA flash attention, DDP buckets and FSDP2 prefetch
# overlapped, DTensor tensor parallelism without overlap, torch.distributed.pipelining,
# selective recompute of the elementwise ops (zhilu/parallel/recompute.py), fused AdamW on GPUs.
ZHILU = Software("zhilu", selective="elementwise", pipeline_unshards_once=True)


@dataclass(frozen=True)
class Plan:
    """The choices of a parallel training step. ``micro_batch`` is sequences per micro-batch."""

    dp: int
    tp: int
    pp: int
    zero: int = 0
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    precision: str = "bf16"

    def label(self) -> str:
        sched = self.schedule if self.pp > 1 else "-"
        if self.schedule == "interleaved":
            sched += f"x{self.virtual_stages}"
        return (f"dp={self.dp} tp={self.tp}{'+sp' if self.sequence_parallel else ''} pp={self.pp} "
                f"zero={self.zero} mb={self.micro_batch} {sched} {self.recompute}")


@dataclass(frozen=True)
class Estimate:
    """The prediction for one plan."""

    plan: Plan
    micro_batches: int  # per replica and step
    step_time_s: float
    breakdown: dict[str, float]
    memory: Memory
    fits: bool
    tokens_per_s: float
    model_tflops_per_gpu: float
    mfu: float

    @property
    def memory_gib_per_device(self) -> float:
        return self.memory.total / GIB

    def plan_spec(self) -> str:
        """The plan as a ``zhilu train --plan`` SPEC (``mb`` counts micro-batches per step)."""
        from zhilu.perf.job import spec, train_plan

        return spec(train_plan(self))

    def as_dict(self) -> dict[str, object]:
        """The plan's entry of ``zhilu plan --json`` (DESIGN.md section 3)."""
        p = self.plan
        return {"dp": p.dp, "tp": p.tp, "pp": p.pp, "zero": p.zero, "micro_batch": p.micro_batch,
                "schedule": p.schedule, "recompute": p.recompute, "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens_per_s, "model_tflops_per_gpu": self.model_tflops_per_gpu,
                "mfu": self.mfu, "memory_gib_per_device": self.memory_gib_per_device, "fits": self.fits,
                "breakdown": dict(self.breakdown)}


@dataclass(frozen=True, slots=True)
class LayerCost:
    """One layer, one micro-batch, one device: seconds and bytes."""

    compute: float  # forward + backward kernels
    forward: float  # forward kernels (the window that hides a prefetch)
    recompute: float
    tp: float  # exposed tensor-parallel collectives, recompute included
    other: float  # host time to launch the kernels beyond the device time
    saved: float  # activation bytes kept for the backward
    working: float  # bytes of one layer's full activations (live while a recomputed layer runs backward)


@dataclass(frozen=True, slots=True)
class EndCost:
    """Embedding (first stage) or output layer and loss (last stage) for one micro-batch."""

    compute: float
    tp: float
    other: float
    memory: float


class StepModel:
    """Evaluates plans for one model, cluster, global batch and software; caches per-layer costs."""

    def __init__(self, model: Transformer, cluster: Cluster, global_batch: int, software: Software = ZHILU) -> None:
        if global_batch < 1:
            raise ZhiluError("global_batch", f"must be a positive integer, got {global_batch}")
        self.model, self.cluster, self.global_batch, self.software = model, cluster, global_batch, software
        self.device = cluster.device.slowest_of(cluster.devices)
        self._layers: dict[tuple, LayerCost] = {}
        self._ends: dict[tuple, tuple[EndCost, EndCost]] = {}
        self._stage_cache: dict[tuple[int, int], tuple[tuple[int, int, int], tuple[float, float, float]]] = {}

    # --- per-layer work -------------------------------------------------------------------------
    def layer(self, tp: int, sp: bool, b: int, recompute: str, precision: str) -> LayerCost:
        """One layer's cost for micro-batch ``b`` (cached: plans share them)."""
        key = (tp, sp, b, recompute, precision)
        cost = self._layers.get(key)
        if cost is None:
            cost = self._layers[key] = self._layer(tp, sp, b, recompute, precision)
        return cost

    def _layer(self, tp: int, sp: bool, b: int, recompute: str, precision: str) -> LayerCost:
        """Products, attention, elementwise kernels, tensor-parallel traffic and recompute of a layer."""
        m, dev, sw = self.model, self.device, self.software
        eb, s, d = BYTES[precision], m.seq_len, m.head_dim
        tokens = b * s
        groups = m.gemm_groups(tp, sw.fused_projections)  # qkv, output, up, down
        # Overlapped tensor parallelism (Megatron-Core's tp-comm-overlap, PyTorch's async TP) runs
        # each product a collective feeds or drains as tp products of tokens/tp rows, one per
        # chunk of the collective: the forward products and the backward input-gradient ones
        # (the weight gradients reduce over all tokens at once). Each chunk fills its own waves.
        chunks = tp if sw.tp_overlap and sp and tp > 1 and tokens % tp == 0 else 1

        def gemm(rows: int, n: int, k: int, split: int = 1) -> float:
            return split * dev.gemm_seconds(rows // split, n, k, precision)

        g_fwd = [sum(gemm(tokens, n, k, chunks) for n, k in g) for g in groups]
        g_bwd = [sum(gemm(tokens, k, n, chunks) + gemm(k, n, tokens) for n, k in g) for g in groups]
        fwd, bwd = sum(g_fwd), sum(g_bwd)
        rate = dev.attention_tflops(s, d, precision) if sw.flash_attention else None
        if rate:
            att_f = m.attention_flops(b, tp) / (rate * 1e12)
            att_b, att_kernels = 2.5 * att_f, 2
        else:
            elements, f_bytes, b_bytes = m.unfused_attention(b, tp)
            heads = b * m.heads // tp
            scale = dev.memory_seconds(elements * eb / 2)
            batched = dev.gemm_seconds
            att_f = batched(s, s, d, precision, heads) + batched(s, d, s, precision, heads) + f_bytes * scale
            att_b = batched(s, s, d, precision, heads) + 3 * batched(s, d, s, precision, heads) + b_bytes * scale
            att_kernels = 4 + 2 * m.dropout + 6 + 2 * m.dropout
        f_tok, b_tok, k_f, k_b = m.memory_bound_ops(sw.fused_kernels, tp, sp)
        elem_f = dev.memory_seconds(tokens * f_tok * eb / 2)
        elem_b = dev.memory_seconds(tokens * b_tok * eb / 2)
        comm_f = comm_b = 0.0
        if tp > 1:
            # Megatron's tensor parallelism: with sequence parallelism an all-gather before each
            # column-parallel product (qkv, up) and a reduce-scatter after each row-parallel one
            # (output, down), mirrored in backward; without it, an all-reduce after the row-parallel
            # products in forward and after the column-parallel ones in backward.
            act = tokens * m.hidden * eb
            if sp:
                one = collective_seconds("all_gather", act, tp, tp, self.cluster)
                fwd_c = bwd_c = (one, one, one, one)
            else:
                one = collective_seconds("all_reduce", act, tp, tp, self.cluster)
                fwd_c, bwd_c = (0.0, one, 0.0, one), (one, 0.0, one, 0.0)
            comm_f = sum(self._tp_exposed(c, g, tp) for c, g in zip(fwd_c, g_fwd))
            comm_b = sum(self._tp_exposed(c, g, tp) for c, g in zip(bwd_c, g_bwd))
        forward = fwd + att_f + elem_f
        compute = forward + bwd + att_b + elem_b
        kernels = 12 + att_kernels + k_f + k_b + (8 if tp > 1 else 0)
        policy = sw.selective if recompute == "selective" else recompute
        rec, rec_comm, rec_kernels = 0.0, 0.0, 0
        if policy == "full":
            rec, rec_comm, rec_kernels = forward, comm_f, 4 + att_kernels // 2 + k_f
        elif policy == "alternate":
            rec, rec_comm, rec_kernels = forward / 2, comm_f / 2, (4 + att_kernels // 2 + k_f) // 2
        elif policy == "attention":
            rec, rec_kernels = att_f, att_kernels // 2
        elif policy == "ops":  # the all-gathers run again, the reduce-scatters are kept
            rec, rec_comm, rec_kernels = elem_f + fwd / 2, comm_f / 2, k_f + 2
        elif policy == "elementwise":
            rec, rec_kernels = elem_f, k_f
        flash = rate is not None
        per_token = m.saved_bytes_per_token
        full_bytes = per_token(tp, sp, sw.fused_kernels, flash, "none")
        if policy == "alternate":
            kept = (full_bytes + per_token(tp, sp, sw.fused_kernels, flash, "full")) / 2
        else:
            kept = per_token(tp, sp, sw.fused_kernels, flash, policy)
        device_time = compute + rec + comm_f + comm_b + rec_comm
        host_time = (kernels + rec_kernels) * dev.launch_us * 1e-6
        if tp > 1:  # DTensor's own work (per op: recompute runs more) and waiting (per byte)
            host_time += (dev.tp_layer_us * 1e-6 * (kernels + rec_kernels) / kernels
                          + dev.tp_layer_s_per_gb * tokens * m.hidden * eb / 1e9)
        return LayerCost(compute=compute, forward=forward, recompute=rec, tp=comm_f + comm_b + rec_comm,
                         other=self._host(host_time, device_time), saved=tokens * kept * eb / 2,
                         working=tokens * full_bytes * eb / 2)

    def _host(self, host: float, device: float) -> float:
        """What issuing the kernels adds: all of it on a synchronous device (a CPU), else what the
        queued kernels do not cover."""
        return host if self.device.synchronous else max(0.0, host - device)

    def _tp_exposed(self, comm: float, gemm: float, tp: int) -> float:
        """What a tensor-parallel collective adds to the step.

        Without overlap, all of it. Overlapped (Megatron-Core's tp-comm-overlap, async TP), it is
        split in ``tp`` chunks pipelined with the product it feeds or drains: the first chunk
        is exposed, and so is whatever the product is too short to cover; the hidden part still
        occupies the SMs it runs on.
        """
        if not self.software.tp_overlap or comm == 0.0:
            return comm
        exposed = max(comm / tp, comm - gemm)
        return exposed + (comm - exposed) * self.cluster.intra.compute_share

    def ends(self, tp: int, sp: bool, b: int, precision: str) -> tuple[EndCost, EndCost]:
        """The embedding (first stage) and the final norm, output layer and loss (last stage)."""
        key = (tp, sp, b, precision)
        if key not in self._ends:
            self._ends[key] = self._end_costs(tp, sp, b, precision)
        return self._ends[key]

    def _end_costs(self, tp: int, sp: bool, b: int, precision: str) -> tuple[EndCost, EndCost]:
        """Embedding and output-layer costs of one micro-batch (vocabulary-parallel under tp)."""
        m, dev, sw = self.model, self.device, self.software
        eb, tokens, h = BYTES[precision], b * m.seq_len, m.hidden
        vocab = ceil(m.vocab / tp)
        act = tokens * h * eb
        hs = h / tp if sp else h
        # Embedding: gather rows (read + write). Its backward is dense: a zeroed [vocab, hidden]
        # gradient, the rows added in, the whole table added to the fp32 gradient (r + w).
        table = vocab * h
        emb = dev.memory_seconds(tokens * h * 3 * eb + table * (2 * eb + 8))
        emb_tp = collective_seconds("reduce_scatter" if sp else "all_reduce", act, tp, tp, self.cluster)
        # Final norm, logits and the cross-entropy. PyTorch's and Megatron's (vocabulary-parallel)
        # cross-entropy both upcast the logits to fp32 and pass over them about six times in
        # forward and backward: 48 bytes per logit.
        norm = tokens * hs * ((4 + 6) if sw.fused_kernels else (36 + 64)) * eb / 2
        loss = tokens * vocab * CROSS_ENTROPY_BYTES
        head = (dev.gemm_seconds(tokens, vocab, h, precision) + dev.gemm_seconds(tokens, h, vocab, precision)
                + dev.gemm_seconds(h, vocab, tokens, precision) + dev.memory_seconds(norm + loss))
        head_tp = 0.0
        if tp > 1:
            head_tp = (collective_seconds("all_gather", act, tp, tp, self.cluster)
                       + collective_seconds("reduce_scatter", act, tp, tp, self.cluster)) if sp else \
                collective_seconds("all_reduce", act, tp, tp, self.cluster)
            head_tp += 3 * collective_seconds("all_reduce", tokens * 4, tp, tp, self.cluster)
        launch = dev.launch_us * 1e-6
        first = EndCost(emb, emb_tp, self._host(4 * launch, emb + emb_tp), 0.0)
        kernels = 8 if sw.fused_kernels else 30
        dtensor = dev.tp_ends_us * 1e-6 + dev.tp_layer_s_per_gb * act / 1e9 if tp > 1 else 0.0
        last = EndCost(head, head_tp, self._host(kernels * launch + dtensor, head + head_tp),
                       logits_bytes(m, tokens, tp) * eb / 2)
        return first, last

    # --- plans ----------------------------------------------------------------------------------
    def validate(self, plan: Plan) -> None:
        """Raise :class:`ZhiluError` naming the field when ``plan`` cannot run this model here."""
        m, c = self.model, self.cluster
        for name in ("dp", "tp", "pp", "micro_batch", "virtual_stages"):
            if getattr(plan, name) < 1:
                raise ZhiluError(name, f"must be a positive integer, got {getattr(plan, name)}")
        if plan.dp * plan.tp * plan.pp != c.devices:
            raise ZhiluError("dp", f"dp*tp*pp = {plan.dp}*{plan.tp}*{plan.pp} must equal the {c.devices} devices")
        if plan.tp > c.devices_per_node:
            raise ZhiluError("tp", f"tp={plan.tp} must fit in a node of {c.devices_per_node} devices")
        if m.heads % plan.tp or m.kv_heads % plan.tp:
            raise ZhiluError("tp", f"tp={plan.tp} must divide heads={m.heads} and kv_heads={m.kv_heads}")
        if m.ffn % plan.tp:
            raise ZhiluError("tp", f"tp={plan.tp} must divide ffn={m.ffn}")
        if plan.pp > m.layers:
            raise ZhiluError("pp", f"pp={plan.pp} exceeds the {m.layers} layers")
        if self.global_batch % plan.dp:
            raise ZhiluError("dp", f"dp={plan.dp} must divide the global batch {self.global_batch}")
        if (self.global_batch // plan.dp) % plan.micro_batch:
            raise ZhiluError("micro_batch", f"{plan.micro_batch} must divide the {self.global_batch // plan.dp} "
                                            "sequences per data-parallel replica")
        if plan.zero not in (0, 1, 2, 3):
            raise ZhiluError("zero", f"must be 0, 1, 2 or 3, got {plan.zero}")
        if plan.schedule not in SCHEDULES:
            raise ZhiluError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {plan.schedule!r}")
        if plan.recompute not in RECOMPUTE:
            raise ZhiluError("recompute", f"must be one of {', '.join(RECOMPUTE)}, got {plan.recompute!r}")
        if plan.precision not in PRECISIONS:
            raise ZhiluError("precision", f"must be one of {', '.join(PRECISIONS)}, got {plan.precision!r}")
        if plan.schedule == "interleaved":
            micro_batches = self.global_batch // plan.dp // plan.micro_batch
            if plan.pp < 2 or plan.virtual_stages < 2 or plan.pp * plan.virtual_stages > m.layers:
                raise ZhiluError("schedule", f"interleaved needs pp >= 2 and virtual stages >= 2 with at least one "
                                             f"of the {m.layers} layers per chunk (pp={plan.pp}, "
                                             f"v={plan.virtual_stages})")
            if micro_batches % plan.pp:
                raise ZhiluError("schedule", f"interleaved needs the micro-batches ({micro_batches}) to be a "
                                             f"multiple of pp={plan.pp}")
        elif plan.virtual_stages != 1:
            raise ZhiluError("schedule", "virtual stages > 1 need the interleaved schedule")

    def evaluate(self, plan: Plan) -> Estimate:
        """Predict ``plan``'s step time, its breakdown and the memory per device."""
        self.validate(plan)
        return self.estimate(plan)

    def memory_total(self, plan: Plan) -> float:
        """Bytes per device of a valid ``plan`` (cheaper than :meth:`estimate`)."""
        sp = plan.sequence_parallel and plan.tp > 1
        layer = self.layer(plan.tp, sp, plan.micro_batch, plan.recompute, plan.precision)
        _, tail = self.ends(plan.tp, sp, plan.micro_batch, plan.precision)
        return self._memory(plan, layer, tail, self.global_batch // plan.dp // plan.micro_batch).total

    def _stages(self, tp: int, pp: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """Layers and parameters per device of the first, a middle and the last stage."""
        key = (tp, pp)
        if key not in self._stage_cache:
            m = self.model
            layers = stage_layers(m.layers, pp)
            params = (stage_params(m, tp, layers[0], True, pp == 1, pp),
                      stage_params(m, tp, layers[1], False, False, pp) if pp > 2 else 0.0,
                      stage_params(m, tp, layers[2], pp == 1, True, pp))
            self._stage_cache[key] = layers, params
        return self._stage_cache[key]

    def estimate(self, plan: Plan) -> Estimate:
        """:meth:`evaluate` without validation, for plans the search built valid."""
        m, c = self.model, self.cluster
        dp, tp, pp, v = plan.dp, plan.tp, plan.pp, plan.virtual_stages
        sp = plan.sequence_parallel and tp > 1
        micro_batches = self.global_batch // dp // plan.micro_batch
        layer = self.layer(tp, sp, plan.micro_batch, plan.recompute, plan.precision)
        head, tail = self.ends(tp, sp, plan.micro_batch, plan.precision)
        (n_first, n_mid, n_last), params = self._stages(tp, pp)
        dp_per_node, pp_across = members_per_node(tp, dp, c.devices_per_node)
        # a collective hidden under compute still takes the SMs it runs on (Link.compute_share)
        share = (c.intra if dp_per_node == dp else c.inter).compute_share
        traffic = plan  # the ZeRO stage as far as traffic goes
        if plan.pp > 1 and plan.zero > 1 and self.software.pipeline_unshards_once:
            traffic = replace(plan, zero=1)
        z3, z3_once, z3_first = self._zero3_seconds(traffic, layer, dp_per_node, share)
        pp_time = self._p2p_seconds(plan, sp, pp_across)
        per_layer = layer.compute + layer.recompute + layer.tp + layer.other + z3
        ends_first = head.compute + head.tp + head.other
        ends_last = tail.compute + tail.tp + tail.other
        if pp == 1:
            t_first = t_mid = t_last = m.layers * per_layer + ends_first + ends_last + z3_first
        else:
            t_first = n_first * per_layer + pp_time + ends_first + z3_first
            t_mid = n_mid * per_layer + pp_time + z3_once
            t_last = n_last * per_layer + pp_time + ends_last + z3_once
        pipe = pipeline_seconds(t_first, t_mid, t_last, pp, micro_batches, v)
        slowest = max(t_first, t_mid, t_last)
        n_slow, on_first, on_last = ((n_first, True, pp == 1) if slowest == t_first else
                                     (n_last, pp == 1, True) if slowest == t_last else (n_mid, False, False))
        stage_weights = max(params)
        dp_time = self._dp_seconds(traffic, stage_weights, layer, n_slow, dp_per_node, share)
        local = stage_weights / dp if plan.zero >= 1 else stage_weights
        per_param = FOREACH_ADAMW_BYTES if self.software.foreach_adamw else OPTIMIZER_BYTES[plan.precision]
        optimizer = self.device.memory_seconds(local * per_param)
        step = pipe + dp_time + optimizer

        mb = micro_batches
        breakdown = {
            "compute": mb * (n_slow * layer.compute + head.compute * on_first + tail.compute * on_last),
            "recompute": mb * n_slow * layer.recompute,
            "tp_comm": mb * (n_slow * layer.tp + head.tp * on_first + tail.tp * on_last),
            "pp_comm": mb * pp_time,
            "dp_comm_exposed": dp_time + mb * (n_slow * z3 + (z3_first if on_first else z3_once)),
            "bubble": pipe - mb * slowest,
            "optimizer": optimizer,
            "other": mb * (n_slow * layer.other + head.other * on_first + tail.other * on_last),
        }
        memory = self._memory(plan, layer, tail, micro_batches)
        tokens = self.global_batch * m.seq_len
        flops = m.model_flops_per_token * tokens / step / c.devices
        return Estimate(plan=plan, micro_batches=micro_batches, step_time_s=step, breakdown=breakdown, memory=memory,
                        fits=memory.total <= self.device.memory_gib * GIB, tokens_per_s=tokens / step,
                        model_tflops_per_gpu=flops / 1e12, mfu=flops / (self.device.peak_tflops[plan.precision] * 1e12))

    def _zero3_seconds(self, plan: Plan, layer: LayerCost, dp_per_node: int,
                       share: float) -> tuple[float, float, float]:
        """ZeRO-3 per layer, and once per micro-batch on a stage without and with the embedding.

        Each layer's weights are all-gathered in forward and again in backward and its gradients
        reduce-scattered, every micro-batch; prefetch hides what the neighbouring layer's compute
        covers, the first gather and the last reduce-scatter excepted. On the stage that holds the
        embedding those two are the embedding table's: it runs first, so its gather has no compute
        to hide under, and its gradient is the last one backward produces, so its reduce-scatter
        has none either (FSDP1 and FSDP2 alike; where the output layer is in the same unit, as in
        torchtitan's root module until 2025, both tables). FSDP2 keeps the root unit gathered
        from forward to backward. FSDP also copies every gathered buffer out into the weights
        and the gradients in, cast to the reduce type, on the compute stream.
        """
        if plan.zero != 3 or plan.dp == 1:
            return 0.0, 0.0, 0.0
        c, eb = self.cluster, BYTES[plan.precision]
        grad_bytes = self.software.grad_reduce_bytes if plan.precision == "bf16" else 4
        lp = self.model.layer_params / plan.tp
        ag = collective_seconds("all_gather", lp * eb, plan.dp, dp_per_node, c)
        rs = collective_seconds("reduce_scatter", lp * grad_bytes, plan.dp, dp_per_node, c)
        copies = self.device.memory_seconds(lp * (5 * eb + grad_bytes))
        table = self.model.vocab * self.model.hidden / plan.tp
        if self.software.fsdp_output_with_embedding and plan.pp == 1 and not self.model.tied:
            table *= 2
        embedding = (collective_seconds("all_gather", table * eb, plan.dp, dp_per_node, c)
                     + collective_seconds("reduce_scatter", table * grad_bytes, plan.dp, dp_per_node, c))
        copies += 3 * self._fsdp_wait(lp * eb, 1, plan.dp)  # two gathers and a reduce-scatter per layer
        embedding += 2 * self._fsdp_wait(table * eb, 1, plan.dp)
        if not self._dp_overlap(plan):
            return copies + 2 * ag + rs, 0.0, embedding
        backward = layer.compute - layer.forward + layer.recompute
        exposed = max(0.0, ag - layer.forward) + max(0.0, ag + rs - backward)
        return copies + exposed + (2 * ag + rs - exposed) * share, ag + rs, embedding

    def _fsdp_wait(self, nbytes: float, units: int, dp: int) -> float:
        """What one collective over each of ``units`` FSDP units (``nbytes`` of weights in all)
        takes beyond the link model (``Device.fsdp_step_us``, ``fsdp_s_per_gb``)."""
        d = self.device
        return (dp - 1) * (units * d.fsdp_step_us * 1e-6 + d.fsdp_s_per_gb * nbytes / 1e9)

    def _dp_overlap(self, plan: Plan) -> bool:
        """Whether data-parallel traffic runs under compute. DDP's all-reduce runs on the process
        group's own thread, on any device; FSDP overlaps through device streams, which a CPU
        does not have, so there it waits for each gather and reduce-scatter."""
        return self.software.dp_overlap and not (self.device.synchronous and plan.zero >= 1)

    def _p2p_seconds(self, plan: Plan, sp: bool, across_nodes: bool) -> float:
        """Pipeline transfers per micro-batch and stage: an activation forward and a gradient back,
        per chunk. Without sequence parallelism Megatron-LM sends 1/tp and all-gathers it."""
        if plan.pp == 1:
            return 0.0
        c, tp = self.cluster, plan.tp
        nbytes = plan.micro_batch * self.model.seq_len * self.model.hidden * BYTES[plan.precision]
        gather = 0.0
        if sp:
            nbytes /= tp  # the activation between layers is already split over the sequence
        elif self.software.p2p_scatter_gather and tp > 1:
            gather = collective_seconds("all_gather", nbytes, tp, tp, c)
            nbytes /= tp
        seconds = 2 * plan.virtual_stages * (p2p_seconds(nbytes, across_nodes, c) + gather)
        if self.software.pp_overlap:
            return seconds * (c.inter if across_nodes else c.intra).compute_share
        return seconds

    def _dp_seconds(self, plan: Plan, weights: float, layer: LayerCost, layers: int, dp_per_node: int,
                    share: float) -> float:
        """Exposed data-parallel traffic of ZeRO 0-2 (ZeRO-3's is per layer): the gradients'
        all-reduce (reduce-scatter with ZeRO-1/2) of the stage with the most weights, and ZeRO-1/2's
        parameter all-gather. Overlapped, the gradients hide under the last micro-batch's backward
        (all but the last bucket) and the gather under the next step's first forward."""
        dp = plan.dp
        if dp == 1 or plan.zero == 3:
            return 0.0
        c, eb = self.cluster, BYTES[plan.precision]
        grad_bytes = self.software.grad_reduce_bytes if plan.precision == "bf16" else 4
        kind = "all_reduce" if plan.zero == 0 else "reduce_scatter"
        grads = collective_seconds(kind, weights * grad_bytes, dp, dp_per_node, c)
        gather = collective_seconds("all_gather", weights * eb, dp, dp_per_node, c) if plan.zero else 0.0
        passes = 1
        if plan.zero == 2:  # weights gathered and gradients reduce-scattered for every micro-batch
            passes = self.global_batch // dp // plan.micro_batch
            grads, gather = grads * passes, gather * passes
        # FSDP's per-unit collectives (the layers' and the root's): a gather and a reduce-scatter
        fsdp = 2 * passes * self._fsdp_wait(weights * eb, layers + 1, dp) if plan.zero else 0.0
        if not self._dp_overlap(plan):
            return grads + gather + fsdp
        sw = self.software
        if sw.bucket_params:
            params = min(weights, max(sw.bucket_params, sw.bucket_params_per_dp * dp))
            grad_bucket, param_bucket = params * grad_bytes, params * eb
        else:
            grad_bucket = param_bucket = sw.bucket_mb * 1e6
        backward = layers * (layer.compute - layer.forward + layer.recompute)
        exposed = max(grads - backward,
                      collective_seconds(kind, min(grad_bucket, weights * grad_bytes), dp, dp_per_node, c))
        if gather:
            exposed += max(gather - layers * layer.forward,
                           collective_seconds("all_gather", min(param_bucket, weights * eb), dp, dp_per_node, c))
        return exposed + (grads + gather - exposed) * share + fsdp

    def _memory(self, plan: Plan, layer: LayerCost, tail: EndCost, micro_batches: int) -> Memory:
        """Memory of the stage that needs the most: the first (most micro-batches in flight), a
        middle one (more layers when they do not divide), or the last (logits)."""
        pp = plan.pp
        grad_bytes = self.software.grad_reduce_bytes if plan.precision == "bf16" else 4
        buffers = 0.0
        if plan.zero == 3 and plan.dp > 1:
            buffers = zero3_buffers(self.model, plan.tp, plan.precision, grad_bytes)
        # a layer recomputed in full or by op is rebuilt whole during its backward
        rebuilt = plan.recompute == "full" or (plan.recompute == "selective" and self.software.selective != "attention")
        working = layer.working if rebuilt else 0.0
        layers, params = self._stages(plan.tp, pp)
        best: Memory | None = None
        for rank, i in ((0, 0), (1, 1), (pp - 1, 2)) if pp > 2 else ((0, 0), (pp - 1, 2)):
            w, g, o = state_bytes(params[i], plan.precision, plan.zero, plan.dp)
            flight = in_flight(plan.schedule, pp, micro_batches, plan.virtual_stages, rank)
            act = flight * layers[i] * layer.saved + working + (tail.memory if i == 2 or pp == 1 else 0.0)
            mem = Memory(w, g, o, act, buffers)
            if best is None or mem.total > best.total:
                best = mem
        assert best is not None
        return best
