"""JobConfig: typed sections, TOML file + ``--section.key value`` overrides, validation.

Every value has a default, so ``zhilu train`` with no arguments is a complete job. Unknown
sections or keys, wrong types and out-of-range values raise :class:`ZhiluError` naming the
field, before anything starts.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhilu.errors import ZhiluError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSection:
    preset: str = "gpt-tiny"
    # Shape overrides; 0 keeps the preset's value.
    n_layers: int = 0
    hidden: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    compile: bool = False  # torch.compile the model


@dataclass
class DataSection:
    path: str = ""  # text file, folder of text files or uint16 .bin; "" = the Python standard library
    val_fraction: float = 0.05


@dataclass
class TrainSection:
    steps: int = 250
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel replicas
    seq_len: int = 0  # 0 = the model's max_seq_len
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decay ends here
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    sample_tokens: int = 160  # length of the sample generated at the end; 0 = none


@dataclass
class ParallelSection:
    plan: str = ""  # e.g. "dp=2,zero=3"; "" = data parallel over all processes; "auto" = the fastest predicted
    hardware: str = ""  # preset or hardware file the prediction uses; "" = this machine's calibration
    average_optimizer_state: bool = False  # with avg_every: average AdamW's moments too


@dataclass
class LaunchSection:
    nproc: int = 0  # local processes; 0 = one per GPU on CUDA, 1 on CPU
    device: str = "auto"  # auto | cpu | cuda
    port: int = 0  # rendezvous port for local processes; 0 = pick a free one
    max_restarts: int = 0  # restart the whole job this many times after a crash


@dataclass
class CheckpointSection:
    every: int = 0  # save every N steps (and always at the end); 0 = only at the end
    keep: int = 3  # keep the newest K checkpoints; 0 = all
    resume: bool = False  # continue from RUN_DIR/checkpoints/latest


@dataclass
class RunSection:
    out: str = ""  # run directory; "" = runs/<preset>-<timestamp>


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        """Build from nested dicts (as TOML gives them), rejecting unknown or mistyped keys."""
        cfg = cls()
        for section, values in data.items():
            target = _section(cfg, section)
            if not isinstance(values, dict):
                raise ZhiluError(section, f"must be a table of keys, got {values!r}")
            for key, value in values.items():
                _set(target, section, key, value)
        cfg.validate()
        return cfg

    def override(self, dotted: str, text: str) -> None:
        """Apply ``--section.key value`` (value given as command-line text)."""
        section, _, key = dotted.partition(".")
        target = _section(self, section)
        if not key:
            raise ZhiluError(dotted, f"name a key, e.g. --{section}.{_fields(target)[0]} VALUE")
        _set(target, section, key, _parse_text(section, key, _field_type(target, section, key), text))

    def validate(self) -> None:
        t, m = self.train, self.model
        _positive("train.steps", t.steps)
        _positive("train.global_batch", t.global_batch)
        _at_least("train.seq_len", t.seq_len, 0)
        _at_least("train.warmup_steps", t.warmup_steps, 0)
        _positive("train.log_every", t.log_every)
        _at_least("train.eval_every", t.eval_every, 0)
        _positive("train.eval_batches", t.eval_batches)
        _at_least("train.sample_tokens", t.sample_tokens, 0)
        _at_least("train.grad_clip", t.grad_clip, 0)
        _at_least("train.weight_decay", t.weight_decay, 0)
        if not t.lr > 0:
            raise ZhiluError("train.lr", f"must be positive, got {t.lr}")
        if not 0 <= t.min_lr <= t.lr:
            raise ZhiluError("train.min_lr", f"must be between 0 and train.lr={t.lr}, got {t.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(t, name) < 1:
                raise ZhiluError(f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden"):
            _at_least(f"model.{name}", getattr(m, name), 0)
        if not 0 < self.data.val_fraction < 1:
            raise ZhiluError("data.val_fraction", f"must be between 0 and 1, got {self.data.val_fraction}")
        _at_least("launch.nproc", self.launch.nproc, 0)
        if self.launch.device not in ("auto", "cpu", "cuda"):
            raise ZhiluError("launch.device", f"unknown device {self.launch.device!r}; valid: auto, cpu, cuda")
        if not 0 <= self.launch.port <= 65535:
            raise ZhiluError("launch.port", f"must be 0 (pick a free port) or 1-65535, got {self.launch.port}")
        _at_least("launch.max_restarts", self.launch.max_restarts, 0)
        _at_least("checkpoint.every", self.checkpoint.every, 0)
        _at_least("checkpoint.keep", self.checkpoint.keep, 0)


def load_config(path: str | None = None, overrides: list[tuple[str, str]] = ()) -> JobConfig:
    """Read a TOML file (if given), apply ``(dotted_key, text)`` overrides, validate."""
    cfg = JobConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ZhiluError("config", f"file {path!r} does not exist; pass a TOML file such as examples/tiny.toml")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ZhiluError("config", f"{path} is not valid TOML: {e}") from None
        cfg = JobConfig.from_dict(data)
    for dotted, text in overrides:
        cfg.override(dotted, text)
    cfg.validate()
    return cfg


def dump_toml(cfg: JobConfig) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


def _fields(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def _section(cfg: JobConfig, name: str) -> Any:
    if name not in _fields(cfg):
        raise ZhiluError(name, f"unknown section; valid: {', '.join(_fields(cfg))}")
    return getattr(cfg, name)


def _field_type(section: Any, section_name: str, key: str) -> type:
    if key not in _fields(section):
        raise ZhiluError(f"{section_name}.{key}", f"unknown key; valid in [{section_name}]: {', '.join(_fields(section))}")
    hints = typing.get_type_hints(type(section))
    return hints[key]


def _set(section: Any, section_name: str, key: str, value: Any) -> None:
    expected = _field_type(section, section_name, key)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ZhiluError(f"{section_name}.{key}", f"must be {_type_name(expected)}, got {value!r}")
    setattr(section, key, value)


def _parse_text(section: str, key: str, expected: type, text: str) -> Any:
    try:
        if expected is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return expected(text)
    except ValueError:
        raise ZhiluError(f"{section}.{key}", f"must be {_type_name(expected)}, got {text!r}") from None


def _type_name(t: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def _positive(name: str, value: int) -> None:
    _at_least(name, value, 1)


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        kind = "integer" if isinstance(value, int) else "number"
        what = f"a positive {kind}" if low == 1 else f"at least {low}"
        raise ZhiluError(name, f"must be {what}, got {value}")
