"""Text from a trained language model: autoregressive sampling without a KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, max_seq_len: int, temperature: float = 0.8,
             top_k: int | None = 40, generator: torch.Generator | None = None) -> Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``prompt`` [1, t] and return [1, t + new].

    ``model`` maps token ids [b, t] to logits [b, t, vocab]; the context is cropped to the last
    ``max_seq_len`` tokens. ``temperature=0`` picks the most likely token; otherwise sampling is
    from the ``top_k`` most likely tokens (all when ``top_k`` is None) at that temperature,
    drawing from ``generator`` (on the model's device) when given.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -max_seq_len:])[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat((tokens, next_token), dim=1)
    return tokens


@torch.no_grad()
def sample_text(spec: Any, data: Any, checkpoint: Path, n_tokens: int, device: torch.device, autocast: Any,
                seed: int, seq_len: int) -> str | None:
    """Text generated from the start of the validation data by the whole model loaded from
    ``checkpoint`` (so it also proves that checkpoint restores); None without a text form."""
    from zhilu.training.checkpoint import load_model

    if data.prompt is None or data.decode is None:
        return None
    model = spec.create(device)
    load_model(checkpoint, model, no_dist=True, hashed=True)
    generator = torch.Generator(device).manual_seed(seed)
    model.eval()
    with autocast:
        out = generate(model, data.prompt.to(device), n_tokens, spec.max_seq_len or seq_len, generator=generator)
    return data.decode(out[0].tolist())
