"""Training on a prepared dataset: shards memory-mapped, documents shuffled per epoch, resumable anywhere.

Epoch ``e`` of a split is its documents in the order ``default_rng([seed, e]).permutation``,
concatenated into one stream of ``T`` tokens (every epoch has the same ``T``), cut into
``W = (T - 1) // seq_len`` windows of ``seq_len + 1`` tokens, which are taken in the order
``default_rng([seed, e, 1]).permutation(W)``. Sample ``s`` of the run is window ``s % W`` of
epoch ``s // W``; batch ``k`` is samples ``k * global_batch`` to ``(k + 1) * global_batch - 1``,
of which data-parallel rank ``r`` takes the ``r``-th contiguous slice. So a batch is a
function of ``(seed, k)`` alone and a run resumes on any layout from the number of batches
drawn, as with :class:`zhilu.data.loader.ShardedLoader`. Only the windows of a batch are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhilu.data import manifest as mf
from zhilu.data import tokenizer as tk
from zhilu.data.loader import BatchStream
from zhilu.errors import ZhiluError


@dataclass
class Split:
    """The documents of one split: where each lives (shard, offset, length) and the shards, memory-mapped."""

    shards: list[np.ndarray]
    doc_shard: np.ndarray
    doc_start: np.ndarray
    doc_len: np.ndarray
    n_bytes: int

    @property
    def n_tokens(self) -> int:
        return int(self.doc_len.sum())


@dataclass
class PreparedDataset:
    path: Path
    manifest: dict[str, Any]
    sha256: str  # of the manifest: names the dataset
    tokenizer: tk.Tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def split(self, name: str) -> Split:
        entries = [s for s in self.manifest["shards"] if s["split"] == name]
        shards, doc_shard, doc_start, doc_len = [], [], [], []
        for i, s in enumerate(entries):
            tokens = np.memmap(self.path / s["tokens"], dtype=np.dtype(self.manifest["dtype"]).newbyteorder("<"),
                               mode="r", shape=(s["n_tokens"],))
            offsets = np.fromfile(self.path / s["docs"], dtype="<u8").astype(np.int64)
            if offsets[0] != 0 or offsets[-1] != s["n_tokens"] or np.any(np.diff(offsets) < 0):
                raise ZhiluError(mf.FIELD, f"{self.path / s['docs']} does not describe {s['tokens']}; the dataset "
                                           "is damaged: prepare it again")
            shards.append(tokens)
            doc_shard.append(np.full(len(offsets) - 1, i, dtype=np.int32))
            doc_start.append(offsets[:-1])
            doc_len.append(np.diff(offsets))
        if not entries:
            return Split([], *(np.zeros(0, dtype=t) for t in (np.int32, np.int64, np.int64)), 0)
        return Split(shards, np.concatenate(doc_shard), np.concatenate(doc_start), np.concatenate(doc_len),
                     sum(s["bytes"] for s in entries))


def open_dataset(path: str | Path, verify: bool) -> PreparedDataset:
    """The prepared dataset at ``path``: the manifest read, every file's size checked and, with
    ``verify``, its SHA-256 (a flipped byte anywhere is found before training starts)."""
    directory = Path(path).expanduser()
    manifest, digest = mf.read(directory)
    mf.check_shards(directory, manifest, hashes=verify)
    return PreparedDataset(directory, manifest, digest, tk.load(directory, manifest["tokenizer"]))


class DocumentLoader(BatchStream):
    """Endless stream of (inputs, targets) [global_batch // dp_size, seq_len] of one split, for one rank."""

    def __init__(self, split: Split, seq_len: int, global_batch: int, dp_rank: int, dp_size: int, seed: int,
                 skip: frozenset[int] = frozenset(), what: str = "the training data") -> None:
        super().__init__(seed, skip)
        total = split.n_tokens
        if total < seq_len + 1:
            raise ZhiluError("train.seq_len", f"{seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens, but "
                                              f"{what} has only {total}; use a shorter seq_len or more data")
        if global_batch % dp_size:
            raise ZhiluError("train.global_batch", f"{global_batch} is not divisible by the data-parallel degree "
                                                   f"{dp_size}; use a multiple of {dp_size}")
        self.split, self.seq_len, self.global_batch = split, seq_len, global_batch
        local = global_batch // dp_size
        self._rows = range(dp_rank * local, (dp_rank + 1) * local)
        self.windows = (total - 1) // seq_len
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch, as int64 (inputs, targets)."""
        index = self._next_index()
        rows = np.stack([self.window(index * self.global_batch + row) for row in self._rows]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def window(self, sample: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``sample`` of the run."""
        epoch, w = divmod(sample, self.windows)
        order, ends, windows = self._epoch(epoch)
        start = int(windows[w]) * self.seq_len
        need, out = self.seq_len + 1, []
        j = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[j - 1]) if j else 0)
        s = self.split
        while need:
            d = int(order[j])
            piece = s.shards[s.doc_shard[d]][s.doc_start[d] + offset:s.doc_start[d] + min(s.doc_len[d], offset + need)]
            out.append(piece)
            need -= len(piece)
            j, offset = j + 1, 0
        return np.concatenate(out)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order, cumulative ends in that order, and window order of ``epoch`` (the last two epochs kept)."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split.doc_len))
            ends = np.cumsum(self.split.doc_len[order])
            windows = np.random.default_rng([self.seed, epoch, 1]).permutation(self.windows)
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = (order, ends, windows)
        return self._epochs[epoch]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": (self.batches_drawn * self.global_batch) // self.windows}


def document_eval_batches(split: Split, seq_len: int, n_batches: int, batch_size: int, dp_rank: int, dp_size: int,
                          seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of ``n_batches`` validation batches of the split, this rank's share of each."""
    loader = DocumentLoader(split, seq_len, batch_size, dp_rank, dp_size, seed, what="the validation data")
    return [loader.next_batch() for _ in range(n_batches)]
