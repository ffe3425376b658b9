"""The batches a job trains and validates on: zhilu's corpus for a language model, or the model's own dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from zhilu.config import JobConfig, batch_indices
from zhilu.data.corpus import load_corpus
from zhilu.data.loader import ShardedLoader, eval_batches
from zhilu.data.manifest import is_prepared
from zhilu.data.prepared import DocumentLoader, document_eval_batches, open_dataset
from zhilu.data.samples import SampleLoader, sample_eval_batches
from zhilu.durable import sha256
from zhilu.errors import ZhiluError
from zhilu.spec import ModelSpec


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    index: int  # of the batch last returned, over the whole run

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingData:
    loader: Loader
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    prompt: torch.Tensor | None  # the start of the validation text, for the sample (language models)
    decode: Callable[[list[int]], str] | None  # token ids -> text, where the ids have a text form
    description: str  # where the data came from and how much of it there is
    fingerprint: str | None = None  # SHA-256 naming the data (a prepared dataset's manifest, else the tokens)
    bytes_per_token: float | None = None  # of the validation text, where known: loss per byte = loss / this


def describe(cfg: JobConfig, spec: ModelSpec) -> TrainingData:
    """The data of rank 0 of a single replica, checked against the model and, for a prepared
    dataset, against its checksums (for ``prepare`` and ``--dry-run``)."""
    return training_data(cfg, spec, 0, 1, verify=True)


def training_data(cfg: JobConfig, spec: ModelSpec, dp_rank: int, dp_size: int, verify: bool = False) -> TrainingData:
    """This data-parallel rank's batches; raises ZhiluError when data and model do not fit together."""
    t = cfg.train
    if spec.dataset is not None:
        (x, y), (x_val, y_val) = spec.dataset(t.seed)
        loader = SampleLoader(x, y, t.global_batch, dp_rank, dp_size, t.seed, batch_indices(t.skip_batches))
        val = sample_eval_batches(x_val, y_val, t.eval_batches, t.global_batch, dp_rank, dp_size, t.seed)
        text = f"{spec.name}'s own dataset: {len(x):,} training and {len(x_val):,} validation samples"
        return TrainingData(loader, val, None, None, text)
    if is_prepared(cfg.data.path):
        return _prepared(cfg, spec, dp_rank, dp_size, verify)
    corpus = load_corpus(cfg.data.path or None, cfg.data.val_fraction, spec.tokenizer)
    assert spec.vocab_size is not None
    if corpus.vocab_size > spec.vocab_size:
        raise ZhiluError("model.name", f"the data has token ids up to {corpus.vocab_size - 1} but {spec.name} has a "
                                       f"vocabulary of {spec.vocab_size}; choose a model with a larger vocabulary")
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) <= t.seq_len:
            raise ZhiluError("train.seq_len", f"{t.seq_len} is longer than the {split} data ({len(tokens)} tokens); "
                                              f"valid: at most {len(tokens) - 1}, or more data")
    loader = ShardedLoader(corpus.train, t.seq_len, t.global_batch, dp_rank, dp_size, t.seed,
                           batch_indices(t.skip_batches))
    val = eval_batches(corpus.val, t.seq_len, t.eval_batches, t.global_batch, dp_rank, dp_size, seed=t.seed)
    prompt = torch.tensor(corpus.val[:16].astype("int64"))[None]
    if spec.tokenizer is not None:
        decode = spec.tokenizer.decode
    elif corpus.vocab_size <= 256:
        decode = _bytes_text
    else:
        decode = None
    per_byte = 1.0 if spec.tokenizer is None and corpus.vocab_size <= 256 else None
    tokens = ("bytes" if per_byte else "token ids as stored") if spec.tokenizer is None else f"{spec.name}'s tokenizer"
    text = (f"{corpus.source}: {len(corpus.train):,} training and {len(corpus.val):,} validation tokens ({tokens}), "
            f"{t.global_batch} x {t.seq_len} tokens per step")
    return TrainingData(loader, val, prompt, decode, text, _digest(corpus.train, corpus.val) if verify else None,
                        per_byte)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).dtype.str.encode())
        h.update(np.ascontiguousarray(a))
    return h.hexdigest()


def _prepared(cfg: JobConfig, spec: ModelSpec, dp_rank: int, dp_size: int, verify: bool) -> TrainingData:
    """Batches of a dataset ``zhilu data prepare`` wrote, after checking its tokenizer against the model."""
    t = cfg.train
    data = open_dataset(cfg.data.path, verify)
    tok = data.manifest["tokenizer"]
    assert spec.vocab_size is not None
    if data.vocab_size > spec.vocab_size:
        raise ZhiluError("model.name", f"{cfg.data.path} was tokenized with {data.vocab_size:,} ids ({tok['kind']}) "
                                       f"but {spec.name} has a vocabulary of {spec.vocab_size:,}; valid: a zhilu "
                                       "preset (it takes the dataset's vocabulary), or data prepared with the model's "
                                       "tokenizer (--tokenizer hf:DIR)")
    model_tok = getattr(spec.tokenizer, "path", None)
    if model_tok is not None and tok.get("sha256") != sha256(Path(model_tok)):
        raise ZhiluError("data.path", f"{cfg.data.path} was tokenized with {tok['kind']}, not with {spec.name}'s "
                                      f"tokenizer ({model_tok}); valid: data prepared with --tokenizer hf:DIR of "
                                      "this model")
    train, held_out = data.split("train"), data.split("val")
    if not len(held_out.doc_len):
        raise ZhiluError("data.path", f"{cfg.data.path} has no validation documents; valid: data prepared with "
                                      "--val-fraction above 0 from at least 2 documents")
    loader = DocumentLoader(train, t.seq_len, t.global_batch, dp_rank, dp_size, t.seed, batch_indices(t.skip_batches))
    val = document_eval_batches(held_out, t.seq_len, t.eval_batches, t.global_batch, dp_rank, dp_size, seed=t.seed)
    first = held_out.shards[held_out.doc_shard[0]][held_out.doc_start[0]:][:16]
    prompt = torch.tensor(np.asarray(first, dtype=np.int64))[None]
    text = (f"prepared dataset {data.path} (manifest {data.sha256[:12]}): {len(train.doc_len):,} training documents "
            f"({train.n_tokens:,} tokens) and {len(held_out.doc_len):,} validation ({held_out.n_tokens:,} tokens), "
            f"tokenizer {data.manifest['settings']['tokenizer']} ({data.vocab_size:,} ids), {t.global_batch} x "
            f"{t.seq_len} tokens per step")
    return TrainingData(loader, val, prompt, data.tokenizer.decode, text, data.sha256,
                        held_out.n_bytes / held_out.n_tokens)


def _bytes_text(ids: list[int]) -> str:
    """Byte-level ids as text; an id past 255 (a model with a larger vocabulary) is U+FFFD."""
    out, run = [], bytearray()
    for i in ids:
        if i < 256:
            run.append(i)
            continue
        out += [run.decode("utf-8", errors="replace"), "\ufffd"]
        run = bytearray()
    return "".join(out) + run.decode("utf-8", errors="replace")
