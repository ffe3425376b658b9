"""Llama-style decoder: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Module names follow torchtitan (``tok_embeddings``, ``layers.<i>.attention.wq``, ...); the
model's tensor-parallel plan is in :mod:`zhilu.models.gpt.parallelize` and its spec in
:mod:`zhilu.models.gpt.spec`. A pipeline stage is a ``GPT`` whose ``tok_embeddings``,
``norm`` or ``output`` are set to ``None`` and whose ``layers`` hold only its own blocks.
This file imports no parallel code.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zhilu.models.presets import GPTConfig

INIT_STD = 0.02


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [b, t, heads, head_dim] by position (``cos``/``sin``: [t, head_dim/2]).

    Pairs are the two halves of each head, (x[i], x[i + head_dim/2]), as in GPT-NeoX and
    Hugging Face Llama. The rotation is done in fp32 and cast back to ``x.dtype``.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query attention.

    The number of heads is read from the projection outputs at run time, so the module also
    works when ``wq``/``wk``/``wv`` are sharded column-wise (and ``wo`` row-wise) across ranks.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        kv_width = cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.wk = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.wv = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.wo = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        cos, sin = cos[:t], sin[:t]
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: attention, then feed-forward."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    """Decoder-only transformer built from a :class:`GPTConfig`.

    Parameters are always created on the ``meta`` device and filled by
    :meth:`init_weights`: ``GPT(cfg)`` on a real device (the current default device) is
    initialised right away with seed 0, while under ``with torch.device("meta")`` it stays
    empty until ``to_empty(device=...)`` and ``init_weights(seed)``.
    """

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        device = torch.get_default_device()
        with torch.device("meta"):
            self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden)
            self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
            self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
            self.output: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight
            rope_shape = (cfg.max_seq_len, cfg.head_dim // 2)
            self.register_buffer("rope_cos", torch.empty(rope_shape), persistent=False)
            self.register_buffer("rope_sin", torch.empty(rope_shape), persistent=False)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fill the rotary tables and every parameter.

        Embedding and projections: normal(0, 0.02); ``wo`` and ``w2``, which add to the
        residual stream: normal(0, 0.02 / sqrt(2 * n_layers)); RMSNorm weights: 1. Each
        parameter is drawn on the CPU from its own generator, seeded by ``seed`` and the
        parameter's name, so its value depends on nothing else: a pipeline stage that holds
        only some layers, on any device, gets exactly those layers of the whole model. Also
        re-ties ``output.weight`` to ``tok_embeddings.weight`` (``to_empty`` unties them).
        """
        cfg = self.cfg
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2, device=self.rope_cos.device, dtype=torch.float32) / cfg.head_dim
        )
        angles = torch.outer(torch.arange(cfg.max_seq_len, device=inv_freq.device, dtype=torch.float32), inv_freq)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

        if cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        residual_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("wo.weight", "w2.weight")) else INIT_STD
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids [b, t] -> logits [b, t, vocab].

        In a pipeline stage without ``tok_embeddings`` the input is hidden states
        [b, t, hidden]; without ``norm``/``output`` the hidden states are returned.
        """
        t = tokens.size(1)  # under sequence parallelism a later stage sees only its share
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos, self.rope_sin  # each attention takes the first t rows
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @property
    def num_params(self) -> int:
        """Number of parameters, each shared (tied) tensor counted once."""
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: GPTConfig, device: str | torch.device = "cpu", seed: int = 0) -> GPT:
    """Build ``cfg`` on the meta device, materialise it on ``device`` and initialise it.

    The same ``cfg`` and ``seed`` give bit-identical parameters on every rank and device.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
