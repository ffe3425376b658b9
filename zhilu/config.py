"""JobConfig: typed sections, TOML file + ``--section.key value`` overrides, validation.

Every value has a default, so ``zhilu train`` with no arguments is a complete job. Unknown
sections or keys, wrong types and out-of-range values raise :class:`ZhiluError` naming the
field, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
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


def setting(default: Any, help: str) -> Any:
    """A configuration key: its default and what it means (``zhilu train --help`` lists them all)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    name: str = setting("gpt-tiny", "a preset (gpt-tiny, gpt2-124m, gpt-1.3b, llama-1b, llama3-8b, llama3-70b), "
                                    "FILE.py:NAME (a ModelSpec) or hf:DIR (a transformers causal LM)")
    n_layers: int = setting(0, "preset shape override: layers (0 keeps the preset's)")
    hidden: int = setting(0, "preset shape override: hidden size")
    n_heads: int = setting(0, "preset shape override: attention heads")
    n_kv_heads: int = setting(0, "preset shape override: key/value heads (grouped-query attention)")
    ffn_hidden: int = setting(0, "preset shape override: MLP hidden size")
    compile: bool = setting(False, "torch.compile each block")


@dataclass
class DataSection:
    path: str = setting("", "a dataset `zhilu data prepare` wrote, a text file, a folder of text files or uint16 "
                            ".bin tokens; empty: the Python standard library (ignored by a model that brings its "
                            "own dataset)")
    val_fraction: float = setting(0.05, "share of the files (or of the bytes of one file) held out for validation "
                                        "(a prepared dataset has its own split)")
    allow_changed: bool = setting(False, "let --resume continue on data other than the data the run trained on")


@dataclass
class TrainSection:
    steps: int = setting(250, "optimizer steps")
    global_batch: int = setting(16, "sequences (samples) per optimizer step, over all data-parallel replicas")
    seq_len: int = setting(0, "tokens per sequence; 0: the model's maximum (256 for gpt-tiny)")
    lr: float = setting(3e-3, "peak learning rate")
    min_lr: float = setting(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = setting(30, "steps of linear warmup")
    weight_decay: float = setting(0.1, "AdamW weight decay, on parameters of 2 or more dimensions")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "maximum global gradient norm; 0: no clipping")
    seed: int = setting(0, "seed of the weights and of the batches")
    log_every: int = setting(10, "steps between logged steps (metrics.jsonl, progress)")
    eval_every: int = setting(100, "steps between validation passes; 0: only at the end")
    eval_batches: int = setting(8, "global batches per validation pass")
    sample_tokens: int = setting(160, "tokens of the sample generated at the end (language models); 0: none")
    skip_batches: str = setting("", "batches never trained on, by index, e.g. 120,300-310 (known-bad data); "
                                    "the step count does not advance for them")
    on_bad_step: str = setting("skip", "a NaN or inf loss or gradient norm on any rank: skip (drop the update), "
                                       "rollback (to the last checkpoint, skipping the bad batches) or abort")
    bad_steps_in_a_row: int = setting(5, "bad steps in a row after which skip aborts and rollback rolls back")


@dataclass
class ParallelSection:
    plan: str = setting("", "e.g. dp=2,tp=2,zero=3 (keys: dp tp pp zero mb schedule vstages sp recompute "
                            "avg_every avg_groups precision); empty: data parallel over all processes; auto: the fastest "
                            "plan the performance model predicts")
    hardware: str = setting("", "hardware preset or file the prediction and MFU use; empty: this machine's "
                                "calibration, else the GPU's preset")
    average_optimizer_state: bool = setting(False, "with avg_every: average AdamW's moments too")


@dataclass
class LaunchSection:
    nproc: int = setting(0, "local processes; 0: one per GPU on CUDA, on CPU dp x tp x pp of the plan (else 1)")
    device: str = setting("auto", "auto, cpu or cuda")
    port: int = setting(0, "port the store of the local processes listens on (127.0.0.1); 0: a free one")
    max_restarts: int = setting(0, "restart the job from its newest good checkpoint after a crash or a hang, up to "
                                   "this many times")
    hang_timeout: float = setting(0.0, "seconds a rank may make no progress before the job counts as hung; 0: "
                                       "max(5 x the median step, 60 s), and 600 s before the first step and in saves")
    check_memory: bool = setting(True, "refuse a job predicted not to fit in this machine's free memory (CPU RAM "
                                       "or each GPU's), before it starts")


@dataclass
class CheckpointSection:
    every: int = setting(0, "save every N steps (and always at the end); 0: only at the end")
    keep: int = setting(3, "keep the newest K checkpoints; 0: all")
    resume: bool = setting(False, "continue from the newest good checkpoint of the run directory")
    async_: bool = setting(False, "write checkpoints in the background while training goes on")


@dataclass
class MetricsSection:
    tensorboard: bool = setting(False, "write TensorBoard event files in <run>/tensorboard")
    prometheus: int = setting(0, "serve Prometheus metrics on this port while training runs; 0: none")
    host: str = setting("127.0.0.1", "address the Prometheus endpoint binds (0.0.0.0: every interface)")
    profile_step: int = setting(0, "trace this step with the PyTorch profiler on every rank, in <run>/profile; 0: none")
    tp_comm: bool = setting(False, "time tensor-parallel traffic apart from forward and backward, on CPU (a dispatch "
                                   "mode sees every operator: costs; see benchmarks/overhead.py --tp-comm)")


@dataclass
class RunSection:
    out: str = setting("", "run directory; empty: runs/<model>-<time>")


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: {_key(f): getattr(getattr(self, section), f.name) for f in dataclasses.fields(getattr(self, section))}
                for section in _fields(self)}

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
        if not 0 <= t.seed <= SEED_MAX:
            raise ZhiluError("train.seed", f"must be 0 or more (numpy's default_rng takes no negative seed) and at "
                                           f"most {SEED_MAX} (torch's generators take seed x {MODULE_SEED_STRIDE} + "
                                           f"a module's crc32, below 2**64), got {t.seed}")
        _at_least("train.grad_clip", t.grad_clip, 0)
        _at_least("train.weight_decay", t.weight_decay, 0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(t, name)):
                raise ZhiluError(f"train.{name}", f"must be a finite number, got {getattr(t, name)}")
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
        if not 0 <= self.metrics.prometheus <= 65535:
            raise ZhiluError("metrics.prometheus", f"must be 0 (no endpoint) or a port 1-65535, got "
                                                   f"{self.metrics.prometheus}")
        _at_least("metrics.profile_step", self.metrics.profile_step, 0)
        if not self.metrics.host.strip():
            raise ZhiluError("metrics.host", "must be an address such as 127.0.0.1")
        _at_least("checkpoint.every", self.checkpoint.every, 0)
        _at_least("checkpoint.keep", self.checkpoint.keep, 0)
        if t.on_bad_step not in BAD_STEP_POLICIES:
            raise ZhiluError("train.on_bad_step", f"unknown policy {t.on_bad_step!r}; valid: {', '.join(BAD_STEP_POLICIES)}")
        _positive("train.bad_steps_in_a_row", t.bad_steps_in_a_row)
        batch_indices(t.skip_batches)
        if not (math.isfinite(self.launch.hang_timeout) and self.launch.hang_timeout >= 0):
            raise ZhiluError("launch.hang_timeout", f"must be 0 (derived from the step time) or a number of seconds, "
                                                    f"got {self.launch.hang_timeout}")


BAD_STEP_POLICIES = ("skip", "rollback", "abort")
# A module's weights are drawn from seed * MODULE_SEED_STRIDE + zlib.crc32(its name) (zhilu.spec,
# zhilu.models.gpt.model, zhilu.models.hf_model); torch.Generator.manual_seed takes at most 2**64 - 1,
# and crc32 is at most 2**32 - 1.
MODULE_SEED_STRIDE = 1_000_003
SEED_MAX = (2**64 - 1 - (2**32 - 1)) // MODULE_SEED_STRIDE


def batch_indices(text: str) -> frozenset[int]:
    """``"120,300-310"`` -> the batch indices it names (``train.skip_batches``)."""
    out: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        low, _, high = item.partition("-")
        try:
            a, b = int(low), int(high or low)
        except ValueError:
            a, b = -1, -1
        if not 0 <= a <= b:
            raise ZhiluError("train.skip_batches", f"{item!r} is not a batch index or range; valid: e.g. 120,300-310")
        out.update(range(a, b + 1))
    return frozenset(out)


def load_config(path: str | None = None, overrides: list[tuple[str, str]] = (), base: str | None = None) -> JobConfig:
    """Read the TOML file ``base`` (a resumed run's own ``config.toml``), then the TOML file ``path``
    over it key by key, then apply ``(dotted_key, text)`` overrides; validate."""
    data: dict[str, Any] = {}
    for source in (base, path):
        for section, values in (_read_toml(source) if source else {}).items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                values = {**data[section], **values}
            data[section] = values
    cfg = JobConfig.from_dict(data)
    for dotted, text in overrides:
        cfg.override(dotted, text)
    cfg.validate()
    return cfg


def _read_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    valid = "pass a TOML file such as examples/tiny.toml"
    if p.is_dir():
        raise ZhiluError("config", f"{path} is a directory; {valid}")
    if not p.exists():
        raise ZhiluError("config", f"file {path!r} does not exist; {valid}")
    if not p.is_file():
        raise ZhiluError("config", f"{path} is not a regular file (a FIFO, socket or device); {valid}")
    try:
        return tomllib.loads(p.read_text())
    except OSError as e:
        raise ZhiluError("config", f"cannot read {path} ({e.strerror}); {valid}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ZhiluError("config", f"{path} is not valid TOML: {e}") from None


def settings_help() -> list[tuple[str, str, Any]]:
    """Every ``section.key`` with its meaning and default, in declaration order."""
    cfg = JobConfig()
    return [(f"{section}.{_key(f)}", f.metadata.get("help", ""), f.default)
            for section in _fields(cfg) for f in dataclasses.fields(getattr(cfg, section))]


def dump_toml(cfg: JobConfig) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


def _fields(section: Any) -> list[str]:
    return [_key(f) for f in dataclasses.fields(section)]


def _key(f: dataclasses.Field) -> str:
    """A setting's key: its field name, less the underscore that lets a Python keyword (async) be one."""
    return f.name.rstrip("_")


def _section(cfg: JobConfig, name: str) -> Any:
    if name not in _fields(cfg):
        raise ZhiluError(name, f"unknown section; valid: {', '.join(_fields(cfg))}")
    return getattr(cfg, name)


def _field_type(section: Any, section_name: str, key: str) -> type:
    if key not in _fields(section):
        raise ZhiluError(f"{section_name}.{key}", f"unknown key; valid in [{section_name}]: {', '.join(_fields(section))}")
    hints = typing.get_type_hints(type(section))
    return hints[_attr(section, key)]


def _attr(section: Any, key: str) -> str:
    return next(f.name for f in dataclasses.fields(section) if _key(f) == key)


def _set(section: Any, section_name: str, key: str, value: Any) -> None:
    expected = _field_type(section, section_name, key)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ZhiluError(f"{section_name}.{key}", f"must be {_type_name(expected)}, got {value!r}")
    setattr(section, _attr(section, key), value)


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
