"""Decoder shapes by name. Pure Python: the planner reads them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, replace

from zhilu.errors import ZhiluError


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a Llama-style decoder (RMSNorm, rotary positions, SwiGLU, causal attention)."""

    n_layers: int
    hidden: int
    n_heads: int
    ffn_hidden: int
    vocab_size: int = 256
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count; ``include_embedding=False`` leaves out the input embedding table."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # wq, wo, wk, wv
        mlp = 3 * h * self.ffn_hidden  # gate, up, down
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        embedding = self.vocab_size * h
        output = 0 if self.tie_embeddings else self.vocab_size * h
        n = self.n_layers * per_layer + h + output  # final norm
        if include_embedding or self.tie_embeddings:
            n += embedding
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of forward + backward per token (no recomputation), as in MFU.

        6 FLOPs per weight of every matmul (the output projection included, the embedding
        lookup not) plus 12 * layers * hidden * seq_len for attention scores and values
        (PaLM, appendix B; causal masking not discounted, the common convention).
        """
        h, kv = self.hidden, self.kv_heads * self.head_dim
        matmul_weights = self.n_layers * (2 * h * h + 2 * h * kv + 3 * h * self.ffn_hidden)
        matmul_weights += self.vocab_size * h
        return 6.0 * matmul_weights + 12.0 * self.n_layers * h * seq_len

    def validate(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ZhiluError(f"model.{name}", f"must be a positive integer, got {getattr(self, name)}")
        if self.hidden % self.n_heads:
            raise ZhiluError("model.n_heads", f"{self.n_heads} does not divide hidden={self.hidden}")
        if self.head_dim % 2:
            raise ZhiluError("model.n_heads", f"head size hidden/n_heads={self.head_dim} must be even for rotary positions")
        if self.n_heads % self.kv_heads:
            raise ZhiluError("model.n_kv_heads", f"{self.kv_heads} does not divide n_heads={self.n_heads}")


PRESETS: dict[str, GPTConfig] = {
    # Byte-level model that trains in a few minutes on two CPU cores.
    "gpt-tiny": GPTConfig(n_layers=4, hidden=192, n_heads=6, ffn_hidden=512, vocab_size=256, max_seq_len=256),
    # GPT-2 small / GPT-3 XL shapes with a SwiGLU MLP of the same parameter count as their 4h GELU MLP.
    "gpt2-124m": GPTConfig(n_layers=12, hidden=768, n_heads=12, ffn_hidden=2048, vocab_size=50304,
                           max_seq_len=1024, tie_embeddings=True),
    "gpt-1.3b": GPTConfig(n_layers=24, hidden=2048, n_heads=16, ffn_hidden=5504, vocab_size=50304,
                          max_seq_len=2048),
    # Llama 3.2 1B and Llama 3 8B / 70B.
    "llama-1b": GPTConfig(n_layers=16, hidden=2048, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                          vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama3-8b": GPTConfig(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                           vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    "llama3-70b": GPTConfig(n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                            vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
}


def preset(name: str, **overrides: object) -> GPTConfig:
    """The preset ``name`` with some fields replaced; raises ZhiluError for an unknown name."""
    if name not in PRESETS:
        raise ZhiluError("model.preset", f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], **overrides)  # type: ignore[arg-type]
    cfg.validate()
    return cfg
