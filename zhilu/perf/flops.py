"""The work of a training step: matrix products, attention and memory-bound kernels per layer.

Everything here counts *work* (FLOPs, bytes, kernels) for one device of a tensor-parallel
group; :mod:`zhilu.perf.step` turns work into time with the device's achieved rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from zhilu.errors import ZhiluError
from zhilu.models.presets import GPTConfig


@dataclass(frozen=True)
class Transformer:
    """A decoder as the performance model sees it: a :class:`GPTConfig` trained at ``seq_len``.

    ``gated_mlp`` is the SwiGLU MLP of zhilu's models (three ffn matrices); False is the
    two-matrix GELU MLP of GPT-2/GPT-3/Megatron models. ``rotary`` and ``dropout`` describe the
    elementwise work of the layer (rotary positions; dropout masks as in GPT-3 training).
    """

    config: GPTConfig
    seq_len: int
    gated_mlp: bool = True
    rotary: bool = True
    dropout: bool = False

    def __post_init__(self) -> None:
        self.config.validate()
        if self.seq_len < 1:
            raise ZhiluError("seq_len", f"must be a positive integer, got {self.seq_len}")

    @property
    def layers(self) -> int:
        return self.config.n_layers

    @property
    def hidden(self) -> int:
        return self.config.hidden

    @property
    def heads(self) -> int:
        return self.config.n_heads

    @property
    def kv_heads(self) -> int:
        return self.config.kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def ffn(self) -> int:
        return self.config.ffn_hidden

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    @property
    def tied(self) -> bool:
        return self.config.tie_embeddings

    @cached_property
    def layer_params(self) -> int:
        """Parameters of one layer (matrices and norms)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn
        return 2 * h * h + 2 * h * kv + mlp + 2 * h

    @cached_property
    def model_flops_per_token(self) -> float:
        """Forward + backward FLOPs per token without recomputation: the MFU numerator.

        :meth:`GPTConfig.flops_per_token`, less the gate matrix for a two-matrix MLP.
        """
        flops = self.config.flops_per_token(self.seq_len)
        return flops if self.gated_mlp else flops - 6.0 * self.layers * self.hidden * self.ffn

    def gemms(self, tp: int) -> tuple[tuple[int, int], ...]:
        """The forward matrix products of one layer as ``(n, k)``: ``[tokens, k] @ [k, n]`` per device."""
        h, d = self.hidden, self.head_dim
        qkv = (self.heads + 2 * self.kv_heads) * d // tp
        up = (2 if self.gated_mlp else 1) * self.ffn // tp
        return (qkv, h), (h, self.heads * d // tp), (up, h), (h, self.ffn // tp)

    def gemm_groups(self, tp: int, fused: bool = True) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The products of :meth:`gemms` as the software runs them: ``(qkv, output, up, down)``.

        ``fused``: one product for q, k and v and one for the gate and up matrices (Megatron's
        ``linear_qkv`` and ``linear_fc1``); else one per weight (torchtitan's and zhilu's Llama:
        ``wq``, ``wk``, ``wv``; ``w1``, ``w3``). The FLOPs are the same, but a narrow ``wk``/``wv``
        fills fewer waves of output tiles (its weight gradient is only ``kv_heads * d / tp`` rows).
        """
        if fused:
            return tuple((g,) for g in self.gemms(tp))
        h, d = self.hidden, self.head_dim
        q, kv = self.heads * d // tp, self.kv_heads * d // tp
        up = ((self.ffn // tp, h),) * (2 if self.gated_mlp else 1)
        return ((q, h), (kv, h), (kv, h)), ((h, q),), up, ((h, self.ffn // tp),)

    def attention_flops(self, micro_batch: int, tp: int) -> float:
        """FLOPs a causal flash-attention forward executes per layer and device.

        ``Q K^T`` and ``P V`` are ``4 * b * s^2 * h`` FLOPs in all, of which a causal kernel
        computes the unmasked half. The backward executes 2.5 times the forward.
        """
        return 2.0 * micro_batch * self.seq_len ** 2 * self.heads * self.head_dim / tp

    def memory_bound_ops(self, fused: bool, tp: int, sp: bool) -> tuple[float, float, int, int]:
        """Bytes per token moved by the layer's elementwise kernels, forward and backward, and kernel counts.

        ``fused`` is Megatron/Transformer-Engine or torch.compile (one kernel per norm,
        activation, residual add; each reads its inputs and writes its outputs once), False
        is eager PyTorch (one kernel per op; the Llama reference RMSNorm computes in fp32).
        Activations are 2 bytes. Under sequence parallelism the norm, residual and dropout
        work on ``1/tp`` of the tokens. See docs/perf_model.md for the op-by-op counts.
        """
        h, f = self.hidden, (2 if self.gated_mlp else 1) * self.ffn // tp
        hs = h / tp if sp else h  # the per-device share of a [tokens, hidden] tensor
        qk = (self.heads + self.kv_heads) * self.head_dim / tp  # rotary positions act on q and k
        o = self.heads * self.head_dim / tp
        drop = 1.0 if self.dropout else 0.0
        if fused:
            # norms (read x, write y; backward reads dy, x, writes dx) x2; residual add with
            # fused dropout (+1 byte mask); rotary 4/4; SwiGLU reads gate, up, writes 1 (GELU 2).
            fwd = hs * (2 * 4 + 2 * (6 + drop)) + (qk * 4 if self.rotary else 0)
            bwd = hs * (2 * 6 + 2 * (6 + drop)) + (qk * 4 if self.rotary else 0)
            fwd += f * (3 if self.gated_mlp else 4)  # per-element of gate and up: (2+2+2)/2; GELU r2 w2
            bwd += f * 5 if self.gated_mlp else f * 6
            kernels_fwd = 6 if self.rotary else 5
        else:
            # RMSNorm in fp32: float() r2w4, pow r4w4, mean r4, mul r4w4, type_as r4w2, *weight r2w2 = 36;
            # its backward 64. Residual adds 6/6. Rotary through complex fp32: 20/20 on q and k.
            # SDPA output transposed to [tokens, heads*dim]: a copy, 4/4. SwiGLU: silu r2w2 and
            # mul r4w2 per ffn element, backward 6 + 12. GELU 4/6. Dropout r2w2+mask 5/5.
            fwd = hs * (2 * 36 + 2 * 6 + 2 * 5 * drop) + o * 4 + (qk * 20 if self.rotary else 0)
            bwd = hs * (2 * 64 + 2 * 6 + 2 * 5 * drop) + o * 4 + (qk * 20 if self.rotary else 0)
            fwd += f * (5 if self.gated_mlp else 4)  # gated: 10 bytes per ffn element over 2 (gate+up)
            bwd += f * 9 if self.gated_mlp else f * 6
            kernels_fwd = 2 * 7 + 2 + 1 + (8 if self.rotary else 0) + 2
        return fwd, bwd, kernels_fwd, 2 * kernels_fwd

    def saved_bytes_per_token(self, tp: int, sp: bool, fused: bool, flash: bool, recompute: str) -> float:
        """Activation bytes one layer keeps per token for its backward (Korthikanti et al. 2022, Sec. 4).

        Without recomputation a GPT-3 layer keeps ``34 h + 5 a s`` bytes per token (tensor
        parallel: ``10 h + 24 h / t + 5 a s / t``; with sequence parallelism all over ``t``).
        Here the same inventory for any shape: norm inputs, GEMM inputs, q/k/v, attention
        scores (unfused) or output and log-sum-exp (flash), MLP activations, dropout masks.
        ``recompute`` is the policy: ``none``; ``attention`` drops the attention core (recomputed,
        Korthikanti's selective recomputation); ``full`` keeps the layer input only;
        ``ops`` (PyTorch's per-op policy in torchtitan) keeps the input, every second product's
        output and the attention output; ``elementwise`` (zhilu's selective) keeps the input, every
        product's output and the attention output.
        """
        h, s, t = self.hidden, self.seq_len, tp
        hs = h / t if sp else h
        drop = 1.0 if self.dropout else 0.0
        if recompute == "full":
            return 2 * hs
        q_kv = 2 * (self.heads + 2 * self.kv_heads) * self.head_dim / t
        o = 2 * self.heads * self.head_dim / t  # attention output = input of the output projection
        products = q_kv + 2 * hs + 2 * (2 if self.gated_mlp else 1) * self.ffn / t + 2 * hs
        if recompute == "ops":
            return 2 * hs + products / 2 + o + 4 * self.heads / t
        if recompute == "elementwise":
            return 2 * hs + products + o + 4 * self.heads / t
        core = 0.0
        if flash:
            core = 4 * self.heads / t  # fp32 log-sum-exp per head
        elif recompute != "attention":
            core = (2 + 3 * drop) * self.heads * s / t  # softmax output, dropout mask and output
        norm = 2 * hs if fused else 6 * hs  # eager RMSNorm keeps x in fp32 and x/rms(x) in bf16
        ffn = self.ffn / t
        mlp = (6 if fused else 8) * ffn if self.gated_mlp else 4 * ffn
        if not fused:
            o *= 2  # eager: SDPA keeps its output and the projection its transposed copy
        # two norms, the QKV and MLP inputs (sharded under SP), q/k/v, output, MLP, two dropout masks
        return 2 * norm + 2 * 2 * hs + q_kv + o + core + mlp + 2 * drop * hs

    def unfused_attention(self, micro_batch: int, tp: int) -> tuple[float, float, float]:
        """Unfused attention (explicit score matrix): score elements per device and bytes per element.

        Megatron's fused scale-mask-softmax reads and writes the fp16 scores (4 bytes per
        element), attention dropout reads, writes and keeps a mask (5); the backward passes
        move 6 (softmax) and 5 (dropout).
        """
        elements = micro_batch * self.heads / tp * self.seq_len ** 2
        drop = 5.0 if self.dropout else 0.0
        return elements, 4.0 + drop, 6.0 + drop
