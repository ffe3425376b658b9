"""Text from a trained language model: autoregressive sampling without a KV cache."""

from __future__ import annotations

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
