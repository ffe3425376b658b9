"""Batches of a model's own dataset (``ModelSpec.dataset``), sharded by data-parallel rank and resumable.

The same contract as :class:`zhilu.data.loader.ShardedLoader` for token windows: batch ``k``
is ``global_batch`` sample indices drawn from ``np.random.default_rng([seed, k])``, of which
data-parallel rank ``r`` takes the ``r``-th contiguous slice, so every plan sees the
single-process batches and resuming needs only the number of batches drawn.
"""

from __future__ import annotations

import numpy as np
import torch

from zhilu.data.loader import BatchStream
from zhilu.errors import ZhiluError


class SampleLoader(BatchStream):
    """Endless stream of (inputs, targets) of ``global_batch // dp_size`` samples for one rank."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int, skip: frozenset[int] = frozenset()) -> None:
        super().__init__(seed, skip)
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ZhiluError("model.dataset", f"needs as many targets as inputs, at least one; got {len(inputs)} "
                                              f"inputs and {len(targets)} targets")
        self.inputs, self.targets = inputs, targets
        self.global_batch = global_batch
        local = global_batch // dp_size
        self._rows = slice(dp_rank * local, (dp_rank + 1) * local)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(self.sample_indices(self._next_index())[self._rows])
        return self.inputs[index], self.targets[index]

    def sample_indices(self, index: int) -> np.ndarray:
        """The ``global_batch`` samples of batch ``index`` (all ranks)."""
        return np.random.default_rng([self.seed, index]).integers(0, len(self.inputs), size=self.global_batch)


def sample_eval_batches(inputs: torch.Tensor, targets: torch.Tensor, n_batches: int, batch_size: int, dp_rank: int,
                        dp_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of ``n_batches`` validation batches, this rank's share of each."""
    loader = SampleLoader(inputs, targets, batch_size, dp_rank, dp_size, seed)
    return [loader.next_batch() for _ in range(n_batches)]
