"""Writing one shard: the tokens of its documents, each ended by the end-of-text id, and their offsets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from zhilu.data.tokenizer import Tokenizer
from zhilu.durable import fsync_dir, sha256

ENCODE_BATCH = 256  # documents handed to the tokenizer at once


def tokenize(texts: list[str], tokenizer: Tokenizer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, concatenated, and the number of tokens of each."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    pieces: list[np.ndarray] = []
    for i in range(0, len(texts), ENCODE_BATCH):
        pieces += [np.asarray(ids + eos, dtype=dtype) for ids in tokenizer.encode_batch(texts[i:i + ENCODE_BATCH])]
    lengths = np.array([len(p) for p in pieces], dtype=np.uint64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False), lengths


def write(directory: Path, name: str, tokens: np.ndarray, lengths: np.ndarray, n_bytes: int) -> dict[str, Any]:
    """Write ``name.tokens`` and ``name.docs`` (the documents' offsets, each file atomically) and
    return the shard's manifest entry."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    entry: dict[str, Any] = {"name": name, "n_tokens": int(len(tokens)), "n_documents": int(len(offsets) - 1),
                             "bytes": n_bytes}
    for suffix, array, key in ((".docs", offsets.astype("<u8"), "docs"), (".tokens", tokens, "tokens")):
        path = directory / (name + suffix)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(array.tobytes())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        entry[key] = path.name
        entry["sha256" if key == "tokens" else "docs_sha256"] = sha256(path)
    fsync_dir(directory)
    return entry
