"""One layer, the embedding and the output layer, per micro-batch and device: seconds and bytes.

Per micro-batch and device, each layer costs its forward and backward kernels (matrix
products at the device's achieved rate for their shape, attention, memory-bound
elementwise kernels), what its recompute mode runs again, and the tensor-parallel
collectives that are not hidden; the embedding and the output layer with the loss are
costed apart (they sit on the first and the last pipeline stage). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from zhilu.perf.comm import collective_seconds
from zhilu.perf.device import Cluster, Device
from zhilu.perf.flops import Transformer
from zhilu.perf.memory import logits_bytes
from zhilu.perf.rates import BYTES
from zhilu.perf.software import Software

CROSS_ENTROPY_BYTES = 48  # per logit, forward and backward (see LayerCosts._end_costs)


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


class LayerCosts:
    """Per-layer and end costs of one model on one device and cluster, cached: plans share them."""

    def __init__(self, model: Transformer, cluster: Cluster, device: Device, software: Software) -> None:
        self.model, self.cluster, self.device, self.software = model, cluster, device, software
        self._layers: dict[tuple, LayerCost] = {}
        self._ends: dict[tuple, tuple[EndCost, EndCost]] = {}

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
