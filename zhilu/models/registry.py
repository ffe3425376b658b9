"""Which model ``--model`` names: a registered name (zhilu's GPT presets), ``FILE.py:NAME`` or ``hf:DIR``.

    zhilu train --model gpt-tiny                    # a preset
    zhilu train --model examples/my_model.py:spec   # NAME in FILE.py: a ModelSpec, or a function returning one
    zhilu train --model hf:path/to/llama            # a transformers causal LM from a local directory
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from zhilu.config import JobConfig
from zhilu.errors import ZhiluError
from zhilu.models.presets import PRESETS, preset
from zhilu.spec import ModelSpec

FIELD = "model.name"
SHAPE_KEYS = ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden")

# name -> factory(shape overrides (and vocab_size on a prepared dataset), seq_len) -> ModelSpec
REGISTRY: dict[str, Callable[[dict[str, int], int], ModelSpec]] = {}


def register(name: str, factory: Callable[[dict[str, int], int], ModelSpec]) -> None:
    """Make ``--model NAME`` build ``factory(shape_overrides, seq_len)``."""
    REGISTRY[name] = factory


def _gpt_preset(name: str) -> Callable[[dict[str, int], int], ModelSpec]:
    def factory(shape: dict[str, int], seq_len: int) -> ModelSpec:
        from zhilu.models.gpt.spec import gpt_spec

        cfg = preset(name, **shape)
        cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))
        return gpt_spec(cfg, name)
    return factory


for _name in PRESETS:
    register(_name, _gpt_preset(_name))


def spec_of(cfg: JobConfig) -> ModelSpec:
    """The spec of the model a job configuration names (``model.name`` and the shape overrides);
    on a prepared dataset a preset takes the dataset's vocabulary."""
    from zhilu.data.manifest import vocab_size

    return resolve(cfg.model.name, {k: getattr(cfg.model, k) for k in SHAPE_KEYS}, cfg.train.seq_len,
                   vocab_size(cfg.data.path))


def resolve(name: str, shape: dict[str, int] | None = None, seq_len: int = 0, vocab_size: int = 0) -> ModelSpec:
    """The spec ``name`` refers to; ``shape`` overrides a preset's shape (``n_layers``, ``hidden``, ...) and
    ``vocab_size`` its vocabulary, rounded up to a multiple of 128 (Megatron-LM's
    ``--make-vocab-size-divisible-by`` default: the embedding splits evenly over tensor-parallel ranks)."""
    shape = {k: v for k, v in (shape or {}).items() if v}
    if name in REGISTRY:
        vocab = {"vocab_size": -(-vocab_size // 128) * 128} if vocab_size else {}
        spec = REGISTRY[name]({**shape, **vocab}, seq_len)
    else:
        if shape:
            key = next(iter(shape))
            raise ZhiluError(f"model.{key}", f"shape overrides apply to the presets ({', '.join(REGISTRY)}), "
                                             f"not to {name}")
        if name.startswith("hf:"):
            from zhilu.models.hf import load

            spec = load(name[3:])
        elif ".py:" in name:
            spec = _from_file(*name.rsplit(":", 1))
        else:
            raise ZhiluError(FIELD, f"unknown model {name!r}; valid: {', '.join(REGISTRY)}, FILE.py:NAME or hf:DIR")
    return replace(spec, source=name)


def _from_file(path: str, attr: str) -> ModelSpec:
    """NAME from the Python file PATH: a ModelSpec, or a function of no arguments returning one."""
    import importlib.util
    import sys
    import zlib
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ZhiluError(FIELD, f"{path} does not exist; valid: FILE.py:NAME with FILE.py a Python file")
    module_name = f"zhilu_user_{zlib.crc32(str(file.resolve()).encode()):08x}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, file)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # so that pickling by reference finds its functions in this process
        loader_spec.loader.exec_module(module)
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise ZhiluError(FIELD, f"{path} defines no {attr!r}; valid: a ModelSpec or a function returning one, "
                                f"such as {', '.join(names[:8]) or 'spec'}")
    found: Any = getattr(module, attr)
    if callable(found) and not isinstance(found, ModelSpec):
        found = found()
    if not isinstance(found, ModelSpec):
        raise ZhiluError(FIELD, f"{path}:{attr} is a {type(found).__name__}; valid: a zhilu.ModelSpec or a "
                                "function of no arguments returning one")
    return found
