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
    """Rotate ``x`` [b, t, heads, head_dim] by position (``cos``/``sin``: [t, head_dim/2], or
    [b, t, head_dim/2] when each row has its own positions).

    Pairs are the two halves of each head, (x[i], x[i + head_dim/2]), as in GPT-NeoX and
    Hugging Face Llama. The rotation is done in fp32 and cast back to ``x.dtype``.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[..., None, :].float(), sin[..., None, :].float()
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None) -> Tensor:
        b, t, _ = x.shape
        if cache is None:
            cos, sin = cos[:t], sin[:t]
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
        else:
            k, v, mask = cache.update(k, v)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                               enable_gqa=k.size(1) != q.size(2))
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class LayerCache:
    """One layer's view of a :class:`KVCache` for one forward call."""

    def __init__(self, k: Tensor, v: Tensor, rows: Tensor, positions: Tensor) -> None:
        self.k, self.v, self.rows, self.positions = k, v, rows, positions

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store ``k``/``v`` [b, t, kv_heads, head_dim]; return the keys and values of the rows'
        sequences [b, kv_heads, n, head_dim] up to the last position written, and the mask
        [b, 1, t, n] of the positions each query may attend to (its own and earlier)."""
        self.k[self.rows[:, None], :, self.positions] = k
        self.v[self.rows[:, None], :, self.positions] = v
        n = int(self.positions.max()) + 1
        mask = torch.arange(n, device=k.device) <= self.positions[:, None, :, None]
        return self.k[self.rows, :, :n], self.v[self.rows, :, :n], mask


class KVCache:
    """Keys and values [layers, sequences, kv_heads, max_len, head_dim] of sequences being decoded.

    ``select(rows, positions)`` names, for the next forward, which sequence each input row
    continues and at which positions. A sequence's slot is reused by writing from position 0:
    what the earlier one left at later positions is masked until overwritten.
    """

    def __init__(self, k: Tensor, v: Tensor, layer_index: dict[int, int]) -> None:
        self.k, self.v, self._index = k, v, layer_index
        self.rows = self.positions = torch.zeros(0, dtype=torch.long)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def select(self, rows: Tensor, positions: Tensor) -> KVCache:
        """Let the next forward continue sequences ``rows`` [b] at ``positions`` [b, t]."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache's {self.max_len} tokens")
        self.rows, self.positions = rows.to(self.k.device), positions.to(self.k.device)
        return self

    def layer(self, name: int) -> LayerCache:
        i = self._index[name]
        return LayerCache(self.k[i], self.v[i], self.rows, self.positions)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
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

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Token ids [b, t] -> logits [b, t, vocab].

        In a pipeline stage without ``tok_embeddings`` the input is hidden states
        [b, t, hidden]; without ``norm``/``output`` the hidden states are returned. With a
        ``cache`` (see :meth:`make_cache`, :meth:`KVCache.select`) row ``i`` of ``tokens`` is the
        next tokens of the cache's sequence ``rows[i]`` at positions ``positions[i]``; their keys
        and values are stored and attention covers every earlier position of that sequence.
        """
        t = tokens.size(1)  # under sequence parallelism a later stage sees only its share
        if cache is None:
            if t > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos, self.rope_sin  # each attention takes the first t rows
        else:
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, cache.layer(int(name)) if cache is not None else None)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def make_cache(self, sequences: int, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for ``sequences`` sequences of up to ``max_len`` tokens (default max_seq_len)."""
        p = self.layers[next(iter(self.layers))].attention.wk.weight
        shape = (len(self.layers), sequences, self.cfg.kv_heads, max_len or self.cfg.max_seq_len, self.cfg.head_dim)
        return KVCache(torch.zeros(shape, dtype=p.dtype, device=p.device),
                       torch.zeros(shape, dtype=p.dtype, device=p.device),
                       {int(name): i for i, name in enumerate(self.layers)})

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
