"""Random-window batches, sharded by data-parallel rank and resumable from a step count.

Batch ``k`` is a function of ``(seed, k)`` alone: ``global_batch`` window starts drawn from
``np.random.default_rng([seed, k])``, of which data-parallel rank ``r`` takes the ``r``-th
contiguous slice. Every rank's batch ``k`` concatenated is the single-process batch ``k``,
so a data-parallel run sees exactly the data of a single-process run with the same global
batch, and resuming needs nothing but the number of batches drawn (and the batches skipped:
``train.skip_batches`` and those a rollback passes over), whatever the new layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from zhilu.errors import ZhiluError


class BatchStream:
    """The global position of a stream of batches: batch ``k`` is the ``k``-th drawn, counted
    over the whole run and all ranks; indices in ``skip`` are passed over."""

    def __init__(self, seed: int, skip: frozenset[int] = frozenset()) -> None:
        self.seed, self.skip = seed, set(skip)
        self.batches_drawn = 0
        self.index = -1  # the index of the batch last returned

    def _next_index(self) -> int:
        while self.batches_drawn in self.skip:
            self.batches_drawn += 1
        self.index = self.batches_drawn
        self.batches_drawn += 1
        return self.index

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn, "skip": sorted(self.skip)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_drawn = int(state["batches_drawn"])
        self.skip |= {int(i) for i in state.get("skip", ())}


class ShardedLoader(BatchStream):
    """Endless stream of (inputs, targets) [global_batch // dp_size, seq_len] for one rank."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, global_batch: int, dp_rank: int, dp_size: int, seed: int,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(seed, skip)
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
        self.local_batch = global_batch // dp_size
        self._rows = slice(dp_rank * self.local_batch, (dp_rank + 1) * self.local_batch)
        self._window = np.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch, as int64 (inputs, targets)."""
        starts = self.starts(self._next_index())[self._rows]
        windows = self.tokens[starts[:, None] + self._window]
        inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))
        targets = torch.from_numpy(windows[:, 1:].astype(np.int64))
        return inputs, targets

    def starts(self, index: int) -> np.ndarray:
        """Where the ``global_batch`` windows of batch ``index`` start in the tokens (all ranks)."""
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)


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
