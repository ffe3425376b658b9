"""The GPT presets as ModelSpecs: ``zhilu train --model gpt-tiny`` and the others."""

from __future__ import annotations

from functools import partial

from torch import nn

from zhilu.models.gpt.model import GPT
from zhilu.models.gpt.parallelize import SP_PLAN, TP_PLAN
from zhilu.models.presets import GPTConfig
from zhilu.spec import ModelSpec, PipelineSplit


def _init_weights(model: nn.Module, seed: int) -> None:
    model.init_weights(seed)  # type: ignore[operator]


def gpt_spec(cfg: GPTConfig, name: str = "gpt") -> ModelSpec:
    """The spec of a GPT of shape ``cfg``."""
    cfg.validate()
    return ModelSpec(
        name=name,
        build=partial(GPT, cfg),
        init_weights=_init_weights,
        blocks="layers",
        tp_plan=TP_PLAN,
        sp_plan=SP_PLAN,
        pipeline=PipelineSplit(first=("tok_embeddings",), last=("norm", "output")),
        shape=cfg,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
    )
