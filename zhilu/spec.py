"""ModelSpec: what zhilu needs to know about a model to train it under any plan.

A model plugs into zhilu by a spec, never by editing the trainer (the shape of torchtitan's
``TrainSpec``). The spec says how to build the model and fill its weights from a seed, what
its loss is, and what it declares for parallelism; ``zhilu.parallel`` applies exactly what
is declared and refuses what is not (``tp=2`` on a model without a tensor-parallel plan is
a one-line error naming the field the spec would need).

Contracts of the declarations:

* ``blocks``: dotted name of the ``nn.ModuleDict`` or ``nn.ModuleList`` of repeated blocks,
  the units of FSDP wrapping, activation recomputation and ``torch.compile``.
* ``tp_plan``: module name patterns (``*`` matches one name, e.g. ``layers.*.attention.wq``)
  to a style: ``"colwise"`` / ``"rowwise"`` (Megatron's pair), ``"embedding"`` (split by
  vocabulary), ``"output"`` (split by vocabulary; the loss is computed on sharded logits),
  ``"output_gather"`` (split by vocabulary, logits gathered), ``"sequence_parallel"``
  (a norm, only applied under ``sp=true``), or any ``torch.distributed.tensor.parallel``
  ``ParallelStyle``. ``sp_plan`` holds the entries added under ``sp=true``; without it the
  model does not support sequence parallelism.
* ``pipeline``: the modules before and after the blocks (e.g. the embedding; the final norm
  and output). A pipeline stage is the model with the modules it does not hold set to
  ``None`` and the blocks it does not hold deleted from ``blocks`` (an ``nn.ModuleDict``,
  so names stay those of the whole model); the model's ``forward`` must skip ``None``
  modules and take hidden states instead of inputs when it has no first module.
* ``shape``: the transformer's shape for the performance model; without it zhilu measures
  FLOPs per sample with ``torch.utils.flop_counter`` for MFU and makes no time prediction.
* ``vocab_size``: a language model over token ids ``[0, vocab_size)`` trained on zhilu's
  data; ``dataset``: otherwise, the model's own data, ``seed -> ((x, y), (x_val, y_val))``.

A spec from ``--model`` (a preset, ``FILE.py:NAME``, ``hf:DIR``) is resolved again in each
process; one built in Python and trained on several processes is pickled to them, so its
functions must be module-level functions (or ``functools.partial`` of them).
"""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zhilu.errors import ZhiluError
from zhilu.models.presets import GPTConfig

TP_STYLES = ("colwise", "rowwise", "embedding", "output", "output_gather", "sequence_parallel")


def reset_parameters_by_name(model: nn.Module, seed: int) -> None:
    """Default ``init_weights``: each submodule's own ``reset_parameters()``, drawn from a random
    stream seeded by ``seed`` and the submodule's name, so a pipeline stage holding some of the
    modules gets exactly the whole model's values for them. Buffers that a model computes in
    its ``__init__`` (not reset by ``reset_parameters``) need an ``init_weights`` of its own."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    for name, module in model.named_modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                reset()


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over all positions, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


@dataclass(frozen=True)
class PipelineSplit:
    """Modules a pipeline places before the blocks (on the first stage) and after them (on the last)."""

    first: tuple[str, ...]
    last: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model as zhilu trains it; see the module docstring for each declaration's contract."""

    name: str
    build: Callable[[], nn.Module]  # the whole model; zhilu calls it under torch.device("meta")
    init_weights: Callable[[nn.Module, int], None] = reset_parameters_by_name  # fill a (partial) model from a seed
    loss: Callable[[Tensor, Tensor], Tensor] = token_cross_entropy
    blocks: str | None = None
    tp_plan: Mapping[str, Any] | None = None
    sp_plan: Mapping[str, Any] | None = None
    pipeline: PipelineSplit | None = None
    shape: GPTConfig | None = None
    vocab_size: int | None = None
    max_seq_len: int | None = None
    dataset: Callable[[int], tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]] | None = None
    tokenizer: Tokenizer | None = None
    source: str | None = field(default=None, compare=False)  # the --model it came from; each process resolves it again

    def __post_init__(self) -> None:
        if not all(callable(f) for f in (self.build, self.init_weights, self.loss)):
            raise ZhiluError("model.name", f"{self.name}: build, init_weights and loss must be callables")
        if (self.vocab_size is None) == (self.dataset is None):
            raise ZhiluError("model.name", f"{self.name}: declare vocab_size (a language model on zhilu's data) "
                                      "or dataset (the model's own data), exactly one")
        for key, style in {**(self.tp_plan or {}), **(self.sp_plan or {})}.items():
            if isinstance(style, str) and style not in TP_STYLES:
                raise ZhiluError("model.name", f"{self.name}: tp_plan[{key!r}] = {style!r}; valid: {', '.join(TP_STYLES)} "
                                          "or a torch ParallelStyle")

    @property
    def is_language_model(self) -> bool:
        return self.vocab_size is not None

    def create(self, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
        """The whole model, built on the meta device, materialised on ``device`` and initialised from ``seed``."""
        with torch.device("meta"):
            model = self.build()
        model.to_empty(device=device)
        self.init_weights(model, seed)
        return model

    def num_params(self) -> int:
        """Parameters of the whole model (each shared tensor once), counted on the meta device."""
        with torch.device("meta"):
            return sum(p.numel() for p in self.build().parameters())

    def blocks_of(self, model: nn.Module) -> nn.ModuleDict | nn.ModuleList:
        """The container of repeated blocks of ``model`` (or of one of its pipeline stages)."""
        if self.blocks is None:
            raise ZhiluError("model.name", f"{self.name} declares no blocks")
        found = model.get_submodule(self.blocks)
        if not isinstance(found, (nn.ModuleDict, nn.ModuleList)):
            raise ZhiluError("model.name", f"{self.name}: blocks={self.blocks!r} is a {type(found).__name__}; "
                                      "valid: the name of an nn.ModuleDict or nn.ModuleList")
        return found

    def check_plan(self, plan: Any) -> None:
        """Refuse what ``plan`` asks of the model that the spec does not declare."""
        missing = []
        if plan.tp > 1 and not self.tp_plan:
            missing.append(f"tp={plan.tp} needs the model to declare tp_plan (module name patterns -> colwise, "
                           "rowwise, embedding, output)")
        if plan.sp and not self.sp_plan:
            missing.append("sp=true needs the model to declare sp_plan (its sequence-parallel regions)")
        if plan.pp > 1 and (self.pipeline is None or self.blocks is None):
            missing.append(f"pp={plan.pp} needs the model to declare blocks (an nn.ModuleDict) and pipeline "
                           "(the modules before and after them)")
        if plan.recompute != "none" and self.blocks is None:
            missing.append(f"recompute={plan.recompute} needs the model to declare blocks")
        if missing:
            raise ZhiluError("parallel.plan", f"model {self.name}: {missing[0]}")
        if self.shape is not None:
            plan.check_model(self.shape)
        if plan.pp > 1:
            with torch.device("meta"):
                n = len(self.blocks_of(self.build()))
            if plan.pp * plan.stages_per_rank > n:
                raise ZhiluError("parallel.plan", f"pp x vstages = {plan.pp * plan.stages_per_rank} pipeline stages "
                                                  f"but {self.name} has {n} blocks; valid: at most {n} stages")


def resolve_patterns(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Concrete module names of ``model`` for each pattern of ``plan`` (``*`` matches one name).

    Patterns that match nothing are dropped (a pipeline stage holds only some modules).
    """
    names = [n.split(".") for n, _ in model.named_modules() if n]
    out: dict[str, Any] = {}
    for pattern, style in plan.items():
        parts = pattern.split(".")
        for name in names:
            if len(name) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(name, parts)):
                out[".".join(name)] = style
    return out


def flops_per_item(spec: ModelSpec, seq_len: int, inputs: Tensor, targets: Tensor) -> float:
    """Model FLOPs of forward and backward per token (from a transformer's shape) or, with no
    shape or no sequence, per sample (counted on one sample of ``inputs``)."""
    if spec.shape is not None and seq_len:
        return spec.shape.flops_per_token(seq_len)
    return measure_flops(spec, inputs[:1], targets[:1]) / (seq_len or 1)


def measure_flops(spec: ModelSpec, inputs: Tensor, targets: Tensor,
                  prepare: Callable[[nn.Module], None] | None = None) -> float:
    """FLOPs of one forward and backward of ``spec``'s model on ``inputs``, counted on the meta
    device (after ``prepare`` changes the model, e.g. wraps its blocks for recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = spec.build()
    if prepare is not None:
        prepare(model)
    counter = FlopCounterMode(display=False)
    with counter:
        spec.loss(model(inputs.to("meta")), targets.to("meta")).backward()
    return float(counter.get_total_flops())
