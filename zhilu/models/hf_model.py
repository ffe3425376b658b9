"""A transformers Llama-like causal LM in the shape zhilu stages, and its weights.

:class:`CausalLM` is built from the Hugging Face model's own submodules: ``embed_tokens``,
``layers`` (an ``nn.ModuleDict`` ``"0"..."n-1"`` of the decoder layers, so names stay those of
the whole model in every pipeline stage), ``norm``, ``lm_head`` and ``rotary_emb`` (on every
stage). Its forward is the one of transformers' ``LlamaModel`` / ``MistralModel`` /
``Qwen2Model`` followed by ``lm_head``, for a batch without an attention mask and without a
cache: positions ``0..t-1``, the model's own causal (or sliding-window) masks, the model's own
rotary embedding. Imported by :mod:`zhilu.models.hf` once transformers is known to be installed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from zhilu.errors import ZhiluError

MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def mask_kinds(config: object, model_type: str) -> tuple[str, ...]:
    """The attention mask each layer uses, as the transformers model of ``model_type`` chooses it."""
    n = config.num_hidden_layers  # type: ignore[attr-defined]
    if model_type == "mistral":  # MistralModel: one mask for all layers, sliding when a window is set
        return ("full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention",) * n
    if model_type == "qwen2":  # Qwen2Model: per layer, from config.layer_types
        return tuple(config.layer_types[:n])  # type: ignore[attr-defined]
    return ("full_attention",) * n  # LlamaModel


class CausalLM(nn.Module):
    """Token ids [b, t] -> logits [b, t, vocab], with the modules of a transformers causal LM.

    In a pipeline stage without ``embed_tokens`` the input is hidden states [b, t, hidden];
    without ``norm`` / ``lm_head`` the hidden states are returned.
    """

    def __init__(self, hf_model: nn.Module, kinds: tuple[str, ...]) -> None:
        super().__init__()
        base = hf_model.get_submodule(hf_model.base_model_prefix)  # type: ignore[arg-type]
        self.config = hf_model.config
        self.kinds = kinds
        self.embed_tokens: nn.Module | None = base.embed_tokens
        self.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(base.layers[: len(kinds)])})
        self.norm: nn.Module | None = base.norm
        self.lm_head: nn.Module | None = hf_model.lm_head
        self.rotary_emb = base.rotary_emb

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        masks = {kind: MASKS[kind](config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                   position_ids=position_ids)
                 for kind in {self.kinds[int(key)] for key in self.layers}}
        position_embeddings = self.rotary_emb(h, position_ids=position_ids)
        for key, layer in self.layers.items():
            out = layer(h, attention_mask=masks[self.kinds[int(key)]], position_embeddings=position_embeddings,
                        position_ids=position_ids)
            h = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
        h = self.norm(h) if self.norm is not None else h
        return self.lm_head(h) if self.lm_head is not None else h


def _own_tensors(model: CausalLM) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """(canonical name, module, attribute, tensor) for each parameter and persistent buffer, once each.

    A tied output weight is named ``embed_tokens.weight`` wherever it is held.
    """
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        tensors = [*module.named_parameters(recurse=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False) if n not in non_persistent)]
        for attr, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = f"{module_name}.{attr}" if module_name else attr
            if model.tied and name == "lm_head.weight":
                name = "embed_tokens.weight"
            yield name, module, attr, tensor


def retie_and_refresh(model: CausalLM) -> None:
    """Tie ``lm_head`` to ``embed_tokens`` again (``to_empty`` unties them) and recompute the rotary tables."""
    if model.tied and model.embed_tokens is not None and model.lm_head is not None:
        model.lm_head.weight = model.embed_tokens.weight
    rotary = model.rotary_emb
    device = next(iter(rotary.buffers())).device
    with torch.device("cpu"):
        fresh = type(rotary)(model.config)
    with torch.no_grad():
        for name, buffer in fresh.named_buffers():
            rotary.get_buffer(name).copy_(buffer.to(device))


@torch.no_grad()
def init_from_seed(model: CausalLM, seed: int) -> None:
    """Fill each parameter from ``seed`` and its name alone, as transformers' Llama initialises it.

    Matrices and embeddings: normal(0, ``config.initializer_range``) (an embedding's padding
    row 0); norm weights 1; biases 0. Each tensor is drawn on the CPU from its own generator,
    so a pipeline stage holds exactly those tensors of the whole model, on any device.
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    for name, module, attr, tensor in _own_tensors(model):
        if "norm" in type(module).__name__.lower():
            tensor.fill_(1.0 if attr == "weight" else 0.0)
        elif attr == "bias":
            tensor.zero_()
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            value = torch.empty(tensor.shape).normal_(0.0, std, generator=generator)
            padding = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and padding is not None:
                value[padding] = 0.0
            tensor.copy_(value)


def weight_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it; empty when there are no weights."""
    import json

    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"  # preferred to other files (e.g. Mistral's consolidated.safetensors)
    found: dict[str, Path] = {}
    for file in [single] if single.is_file() else sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({name: file for name in f.keys()})
    return found


def checkpoint_names(model: CausalLM, available: dict[str, Path], prefix: str, where: str) -> dict[str, str]:
    """Wrapper tensor name -> checkpoint tensor name (``model.layers.0...`` or without the prefix)."""
    out = {}
    for name, _, _, _ in _own_tensors(model):
        candidates = [name] if name.startswith("lm_head.") else [f"{prefix}.{name}", name]
        found = next((c for c in candidates if c in available), None)
        if found is None:
            raise ZhiluError("model.name", f"{where}: the safetensors weights hold no {candidates[0]!r}; valid: a "
                                           "checkpoint saved by save_pretrained of the model config.json describes")
        out[name] = found
    return out


def _names_by_file(model: CausalLM, files: dict[str, Path], prefix: str,
                   where: str) -> tuple[dict[str, str], dict[Path, list[str]]]:
    """The checkpoint's name of each tensor ``model`` holds, and those tensors grouped by file."""
    names = checkpoint_names(model, files, prefix, where)
    by_file: dict[Path, list[str]] = {}
    for name, ckpt in names.items():
        by_file.setdefault(files[ckpt], []).append(name)
    return names, by_file


def check_checkpoint(model: CausalLM, files: dict[str, Path], prefix: str, where: str) -> None:
    """Every tensor of ``model`` (on the meta device) is in the checkpoint with its shape."""
    from safetensors import safe_open

    names, by_file = _names_by_file(model, files, prefix, where)
    shapes = {name: tuple(tensor.shape) for name, _, _, tensor in _own_tensors(model)}
    for file, held in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in held:
                shape = tuple(f.get_slice(names[name]).get_shape())
                if shape != shapes[name]:
                    raise ZhiluError("model.name", f"{where}: {file.name} holds {names[name]} of shape {list(shape)} "
                                                   f"but config.json gives it {list(shapes[name])}; valid: weights "
                                                   "and config.json of the same model")


@torch.no_grad()
def init_from_checkpoint(model: CausalLM, files: dict[str, Path], prefix: str, where: str) -> None:
    """Copy into ``model`` (a whole model or a stage) only the tensors it holds, file by file."""
    from safetensors import safe_open

    names, by_file = _names_by_file(model, files, prefix, where)
    tensors = {name: tensor for name, _, _, tensor in _own_tensors(model)}
    for file, held in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in held:
                tensors[name].copy_(f.get_tensor(names[name]))
