"""Random-window batches, sharded by data-parallel rank and resumable from a step count.

Batch ``k`` is a function of ``(seed, k)`` alone: ``global_batch`` window starts drawn from
``np.random.default_rng([seed, k])``, of which data-parallel rank ``r`` takes the ``r``-th
contiguous slice. Every rank's batch ``k`` concatenated is the single-process batch ``k``,
so a data-parallel run sees exactly the data of a single-process run with the same global
batch, and resuming needs nothing but the number of batches drawn.
"""

from __future__ import annotations

import numpy as np
import torch

from zhilu.errors import ZhiluError


class ShardedLoader:
    """Endless stream of (inputs, targets) [global_batch // dp_size, seq_len] for one rank."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, global_batch: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        _check_length(tokens, seq_len, "the training data")
        if global_batch % dp_size:
            raise ZhiluError(
                "train.global_batch",
                f"{global_batch} is not divisible by the data-parallel degree {dp_size}; use a multiple of {dp_size}",
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.local_batch = global_batch // dp_size
        self._rows = slice(dp_rank * self.local_batch, (dp_rank + 1) * self.local_batch)
        self._window = np.arange(seq_len + 1)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch, as int64 (inputs, targets)."""
        rng = np.random.default_rng([self.seed, self.batches_drawn])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)[self._rows]
        self.batches_drawn += 1
        windows = self.tokens[starts[:, None] + self._window]
        inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))
        targets = torch.from_numpy(windows[:, 1:].astype(np.int64))
        return inputs, targets

    def state_dict(self) -> dict[str, int]:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    n_batches: int,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of ``n_batches`` global batches of ``batch_size`` windows, this rank's share of each.

    The same arguments always give the same batches, so evaluation losses are comparable
    across runs, plans and resumes.
    """
    _check_length(tokens, seq_len, "the validation data")
    loader = ShardedLoader(tokens, seq_len, batch_size, dp_rank, dp_size, seed)
    return [loader.next_batch() for _ in range(n_batches)]


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise ZhiluError(
            "train.seq_len",
            f"{seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens, but {what} has only {len(tokens)}; "
            "use a shorter seq_len or more data",
        )
