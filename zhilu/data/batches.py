"""The batches a job trains and validates on: zhilu's corpus for a language model, or the model's own dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from zhilu.config import JobConfig, batch_indices
from zhilu.data.corpus import load_corpus
from zhilu.data.loader import ShardedLoader, eval_batches
from zhilu.data.samples import SampleLoader, sample_eval_batches
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


def describe(cfg: JobConfig, spec: ModelSpec) -> TrainingData:
    """The data of rank 0 of a single replica, checked against the model (for ``prepare`` and ``--dry-run``)."""
    return training_data(cfg, spec, 0, 1)


def training_data(cfg: JobConfig, spec: ModelSpec, dp_rank: int, dp_size: int) -> TrainingData:
    """This data-parallel rank's batches; raises ZhiluError when data and model do not fit together."""
    t = cfg.train
    if spec.dataset is not None:
        (x, y), (x_val, y_val) = spec.dataset(t.seed)
        loader = SampleLoader(x, y, t.global_batch, dp_rank, dp_size, t.seed, batch_indices(t.skip_batches))
        val = sample_eval_batches(x_val, y_val, t.eval_batches, t.global_batch, dp_rank, dp_size, t.seed)
        text = f"{spec.name}'s own dataset: {len(x):,} training and {len(x_val):,} validation samples"
        return TrainingData(loader, val, None, None, text)
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
    text = (f"{corpus.source}: {len(corpus.train):,} training and {len(corpus.val):,} validation tokens, "
            f"{t.global_batch} x {t.seq_len} tokens per step")
    return TrainingData(loader, val, prompt, decode, text)


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
