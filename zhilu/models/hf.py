"""``zhilu train --model hf:DIR``: a Hugging Face ``transformers`` causal LM from a local directory.

    zhilu train --model hf:path/to/llama --plan dp=2,tp=2

DIR holds ``config.json`` (as ``save_pretrained`` writes it), optionally the weights as
``*.safetensors`` (one file, or shards listed in ``model.safetensors.index.json``) and
optionally a tokenizer ``tokenizer.json``. Nothing is downloaded and no code from DIR runs.
Supported: the Llama-like decoders of transformers (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``), wrapped in :class:`zhilu.models.hf_model.CausalLM`
so that zhilu can cut pipeline stages from them. Without weights the model is initialised
from the seed (see :func:`zhilu.models.hf_model.init_from_seed`); with weights the seed is
not used. The model is built and trained in fp32 whatever dtype the checkpoint is stored in.

Tensor parallelism follows the plan transformers declares for the model (``base_model_tp_plan``
on the config, ``_tp_plan`` on the class), translated to zhilu's styles: q/k/v and gate/up
column-wise, o/down row-wise, ``lm_head`` split by vocabulary with the logits gathered, and
``embed_tokens`` split by vocabulary (unless it has a padding row, or is tied to ``lm_head``,
when both stay whole). Sequence parallelism is not declared.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zhilu.errors import ZhiluError
from zhilu.models.presets import GPTConfig
from zhilu.spec import ModelSpec, PipelineSplit, token_cross_entropy

FIELD = "model.name"
PREFIX = "model"  # base_model_prefix of the supported classes: checkpoint names are model.layers.0...
# model_type -> the causal-LM class whose forward CausalLM reproduces
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# transformers' tensor-parallel styles -> zhilu's (None: not applied without sequence parallelism)
TP_STYLES: dict[str, str | None] = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_rep": "output_gather",
    "colwise_gather_output": "output_gather",
    "embedding_rowwise": "embedding",
    "sequence_parallel": None,
}


class HFTokenizer:
    """A ``tokenizer.json`` (the ``tokenizers`` library): text <-> ids, no special tokens added."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tokenizer = Tokenizer.from_file(path)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (HFTokenizer, (self.path,))


def _where(directory: str) -> str:
    return f"hf:{directory}"


def _require_transformers() -> Any:
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as e:
        raise ZhiluError(FIELD, f"hf:DIR needs transformers and safetensors ({e.name} is not installed); "
                                "install them with pip install 'zhilu[hf]'") from None
    return transformers


def read_config(directory: str) -> Any:
    """The transformers config of DIR, checked to be a causal LM zhilu supports; sdpa attention."""
    transformers = _require_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where, path = _where(directory), Path(directory)
    if not path.is_dir():
        raise ZhiluError(FIELD, f"{where}: no such directory; valid: hf:DIR with DIR a local directory holding a "
                                "transformers config.json (e.g. written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise ZhiluError(FIELD, f"{where}: the directory has no config.json; valid: a directory written by a "
                                "transformers model's save_pretrained")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ZhiluError(FIELD, f"{where}: config.json is not valid JSON ({e})") from None
    valid = ", ".join(f"{cls} (model_type {t!r})" for t, cls in SUPPORTED.items())
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    architectures = (raw.get("architectures") or []) if isinstance(raw, dict) else []
    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(a not in causal for a in architectures):
        what = ", ".join(architectures) or f"model_type {model_type!r}"
        raise ZhiluError(FIELD, f"{where}: config.json describes {what}, not a causal language model transformers "
                                f"{transformers.__version__} knows; valid: {valid}")
    if model_type not in SUPPORTED or any(a != SUPPORTED[model_type] for a in architectures):
        what = ", ".join(architectures) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        raise ZhiluError(FIELD, f"{where}: {what} is not supported by zhilu yet; valid: {valid}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                                         attn_implementation="sdpa")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ZhiluError(FIELD, f"{where}: transformers cannot read config.json: {str(e).splitlines()[0]}") from None
    return config


def _hf_model(config: Any) -> nn.Module:
    import transformers

    return getattr(transformers, SUPPORTED[config.model_type])(config).float()


def _wrap(hf_model: nn.Module) -> nn.Module:
    from zhilu.models.hf_model import CausalLM, mask_kinds

    return CausalLM(hf_model, mask_kinds(hf_model.config, hf_model.config.model_type))


def build(directory: str) -> nn.Module:
    """The whole model (zhilu calls this under ``torch.device("meta")``)."""
    return _wrap(_hf_model(read_config(directory)))


def hf_tp_plan(hf_model: nn.Module) -> dict[str, str]:
    """The tensor-parallel plan transformers resolves for ``hf_model`` (names under the causal LM)."""
    plan = getattr(hf_model, "tp_plan", None)  # transformers >= 5: the class's and the config's plans merged
    if isinstance(plan, dict):
        return dict(plan)
    config = hf_model.config
    return {**{f"{PREFIX}.{k}": v for k, v in (config.base_model_tp_plan or {}).items()},
            **(getattr(type(hf_model), "_tp_plan", None) or {})}


def init_weights(directory: str, model: nn.Module, seed: int) -> None:
    """Fill ``model`` (whole or a stage): from DIR's safetensors when present, else from ``seed``."""
    from zhilu.models.hf_model import init_from_checkpoint, init_from_seed, retie_and_refresh, weight_files

    retie_and_refresh(model)  # type: ignore[arg-type]
    files = weight_files(Path(directory))
    if files:
        init_from_checkpoint(model, files, PREFIX, _where(directory))  # type: ignore[arg-type]
    else:
        init_from_seed(model, seed)  # type: ignore[arg-type]


def translate_tp_plan(hf_plan: dict[str, str], prefix: str, tied: bool, padded: bool, where: str) -> dict[str, str]:
    """transformers' tensor-parallel plan (names under the causal LM) in zhilu's names and styles."""
    out: dict[str, str] = {}
    for name, style in hf_plan.items():
        if style not in TP_STYLES:
            known = ", ".join(s for s in TP_STYLES)
            raise ZhiluError(FIELD, f"{where}: transformers plans {name!r} as tensor-parallel style {style!r}, "
                                    f"which zhilu cannot translate; valid styles: {known}")
        local = name.removeprefix(f"{prefix}.")
        translated = TP_STYLES[style]
        if translated is None:
            continue
        if local in ("embed_tokens", "lm_head") and tied:
            continue  # one tensor cannot be split both ways; both stay whole
        if local == "embed_tokens" and padded:
            continue  # a padding row's gradient is masked by its global index: keep the table whole
        out[local] = translated
    return out


def _shape(config: Any) -> GPTConfig | None:
    """The decoder's shape for the performance model, when it is a plain Llama-style one."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size or getattr(config, "hidden_act", "silu") != "silu":
        return None
    rope = getattr(config, "rope_parameters", None) or {}
    shape = GPTConfig(
        n_layers=config.num_hidden_layers, hidden=config.hidden_size, n_heads=heads,
        ffn_hidden=config.intermediate_size, vocab_size=config.vocab_size,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        max_seq_len=config.max_position_embeddings, norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
    shape.validate()
    return shape


def _tokenizer(path: Path, vocab_size: int, where: str) -> HFTokenizer | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        others = [n for n in ("tokenizer.model", "vocab.json", "tokenizer_config.json") if (path / n).is_file()]
        if others:
            raise ZhiluError(FIELD, f"{where}: has {others[0]} but no tokenizer.json; valid: save a fast tokenizer "
                                    "there (AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes it)")
        if vocab_size < 256:
            raise ZhiluError(FIELD, f"{where}: without a tokenizer.json zhilu trains on bytes, which needs a "
                                    f"vocabulary of at least 256 and config.json gives vocab_size={vocab_size}")
        return None
    try:
        tokenizer = HFTokenizer(str(file))
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise ZhiluError(FIELD, f"{where}: tokenizer.json cannot be read: {str(e).splitlines()[0]}") from None
    if tokenizer.vocab_size > vocab_size:
        raise ZhiluError(FIELD, f"{where}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json gives "
                                f"vocab_size={vocab_size}; valid: a tokenizer of at most vocab_size tokens")
    return tokenizer


def load(directory: str) -> ModelSpec:
    """The ModelSpec of the transformers causal LM in ``directory`` (see the module docstring)."""
    from zhilu.models.hf_model import check_checkpoint, weight_files

    config = read_config(directory)
    where, path = _where(directory), Path(directory)
    absolute = str(path.resolve())
    with torch.device("meta"):
        hf_model = _hf_model(config)
        hf_plan = hf_tp_plan(hf_model)
        model = _wrap(hf_model)
    files = weight_files(path)
    if files:
        check_checkpoint(model, files, PREFIX, where)  # type: ignore[arg-type]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    padded = getattr(config, "pad_token_id", None) is not None
    tp_plan = translate_tp_plan(hf_plan, PREFIX, tied, padded, where)
    return ModelSpec(
        name=path.resolve().name,
        build=partial(build, absolute),
        init_weights=partial(init_weights, absolute),
        loss=token_cross_entropy,
        blocks="layers",
        tp_plan=tp_plan or None,
        pipeline=PipelineSplit(first=("embed_tokens",), last=("norm", "lm_head")),
        shape=_shape(config),
        vocab_size=int(config.vocab_size),
        max_seq_len=int(config.max_position_embeddings),
        tokenizer=_tokenizer(path, int(config.vocab_size), where),
        source=_where(directory),
    )
