"""Plan: how one training step is laid out over the processes; the one plan type of zhilu.

``zhilu train``, ``zhilu plan``, ``--plan auto``, calibration and the performance model all
use :class:`Plan`, its validator and :func:`stage_layers`, so a prediction describes what runs.
A plan SPEC is comma-separated ``key=value`` (``zhilu train --plan dp=2,zero=3``):

==========  =================================================================
dp, tp, pp  data-, tensor- and pipeline-parallel degrees; their product is the world size
zero        0 = DDP replicas; 1, 2, 3 = ZeRO stages on the dp axis through FSDP2
mb          micro-batches per step and replica (gradient accumulation; pipeline micro-batches)
schedule    pipeline schedule: gpipe, 1f1b, interleaved
vstages     pipeline stages per rank (interleaved: default 2; others: 1)
sp          sequence parallelism in the norm regions (needs tp > 1): true or false
recompute   activation recomputation: none, selective, full
avg_every   model averaging (local SGD): average the replicas every H steps; 0 = off
avg_groups  with avg_every: groups of dp / avg_groups replicas train as one DDP each and the
            groups average every H steps (hybrid); 0 = every replica alone
precision   auto (bf16 mixed precision on CUDA, fp32 on CPU), bf16 or fp32
==========  =================================================================

Pure Python: the planner imports it from a cold start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from zhilu.errors import ZhiluError

if TYPE_CHECKING:
    from zhilu.models.presets import GPTConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp32")  # what a plan trains in: bf16 autocast with fp32 master weights, or fp32


class PlanError(ZhiluError):
    """A plan zhilu cannot run. ``field`` is where the user gave it (``parallel.plan`` by default);
    ``key`` the plan field at fault (``dp``, ``mb``, ``schedule``, ...), which ``zhilu plan`` names."""

    def __init__(self, key: str, message: str, field: str = "parallel.plan") -> None:
        super().__init__(field, message)
        self.key = key


def device_precision(device_type: str) -> str:
    """What ``precision=auto`` trains in: bf16 autocast with fp32 master weights on GPUs, fp32 on CPUs."""
    return "bf16" if device_type == "cuda" else "fp32"


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    mb: int = 1
    schedule: str = "1f1b"
    vstages: int = 0  # 0 = the schedule's default
    sp: bool = False
    recompute: str = "none"
    avg_every: int = 0
    avg_groups: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        return self.vstages or (2 if self.schedule == "interleaved" and self.pp > 1 else 1)

    def micro_batch(self, global_batch: int) -> int:
        """Sequences per micro-batch: the global batch over ``dp`` replicas and ``mb`` micro-batches."""
        return global_batch // self.dp // self.mb

    def resolved(self, device_type: str) -> Plan:
        """This plan with ``precision=auto`` made concrete for ``device_type`` (cpu or cuda)."""
        return replace(self, precision=device_precision(device_type)) if self.precision == "auto" else self

    @classmethod
    def parse(cls, spec: str, world_size: int) -> Plan:
        """Parse SPEC; degrees left out are filled so that dp * tp * pp = world_size."""
        values: dict[str, int | str] = {}
        names = [f.name for f in fields(cls)]
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise PlanError(key, f"cannot read {item!r}; valid: comma-separated key=value with keys {', '.join(names)}")
            if key in values:
                raise PlanError(key, f"{key} is given twice")
            if key in ("schedule", "recompute", "precision"):
                values[key] = text.strip()
            elif key == "sp":
                if text.strip().lower() not in ("true", "false", "1", "0"):
                    raise PlanError(key, f"sp={text!r}; valid: true or false")
                values[key] = text.strip().lower() in ("true", "1")
            else:
                try:
                    values[key] = int(text)
                except ValueError:
                    raise PlanError(key, f"{key}={text!r} must be an integer") from None
        if "mb" not in values and int(values.get("pp", 1)) > 1:
            values["mb"] = 2 * int(values["pp"])  # enough micro-batches to keep every stage busy
        if "dp" not in values:
            rest = int(values.get("tp", 1)) * int(values.get("pp", 1))
            values["dp"] = world_size // rest if rest > 0 and world_size % rest == 0 else 0
        plan = cls(**values)  # type: ignore[arg-type]
        plan.validate(world_size)
        return plan

    def validate(self, world_size: int) -> None:
        """The rules every plan obeys, whatever it trains; raises :class:`PlanError`."""
        for key in ("dp", "tp", "pp", "mb"):
            if getattr(self, key) < 1:
                raise PlanError(key, f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.world_size != world_size:
            raise PlanError("dp",
                            f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.world_size} but there are {world_size} "
                            f"processes; make the product {world_size} or change the number of processes")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError("zero", f"zero={self.zero}; valid: 0 (DDP), 1, 2, 3 (ZeRO stages)")
        if self.schedule not in SCHEDULES:
            raise PlanError("schedule", f"schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.recompute not in RECOMPUTE:
            raise PlanError("recompute", f"recompute={self.recompute!r}; valid: {', '.join(RECOMPUTE)}")
        if self.precision not in ("auto", *PRECISIONS):
            raise PlanError("precision", f"precision={self.precision!r}; valid: auto, {', '.join(PRECISIONS)}")
        if self.avg_every < 0:
            raise PlanError("avg_every", f"avg_every must be 0 (off) or a positive number of steps, got {self.avg_every}")
        if self.vstages < 0:
            raise PlanError("vstages", f"vstages must be positive, got {self.vstages}")
        if self.schedule == "interleaved" and self.pp > 1 and self.stages_per_rank < 2:
            raise PlanError("vstages", "the interleaved schedule needs vstages >= 2 stages per rank")
        if self.schedule != "interleaved" and self.stages_per_rank > 1:
            raise PlanError("schedule", f"vstages={self.vstages} needs schedule=interleaved")
        if self.pp > 1 and self.mb < self.pp:
            raise PlanError("mb", f"mb={self.mb} micro-batches cannot fill {self.pp} pipeline stages; "
                                  f"valid: mb >= pp = {self.pp}")
        if self.schedule == "interleaved" and self.pp > 1 and self.mb % self.pp:
            raise PlanError("mb", f"the interleaved schedule needs mb to be a multiple of pp={self.pp}, got mb={self.mb}")
        if self.sp and self.tp == 1:
            raise PlanError("sp", "sp=true shards the norm regions across the tp ranks and needs tp > 1")
        if self.avg_groups and (not self.avg_every or self.avg_groups < 2 or self.dp % self.avg_groups):
            raise PlanError("avg_groups", f"avg_groups={self.avg_groups} needs avg_every and must divide dp={self.dp} "
                                          "into at least 2 groups; valid: a divisor of dp from 2, with avg_every")
        if self.avg_every and (self.zero or self.tp > 1 or self.pp > 1):
            raise PlanError("avg_every", "avg_every (model averaging) trains whole replicas: use it with dp only, zero=0")

    def check_model(self, model: "GPTConfig", *, runtime: bool = True) -> None:
        """Degrees must fit the model's shape. ``runtime``: also what zhilu's runtime cannot run
        (a tied embedding split over pipeline stages); the performance model of other software
        (Megatron-LM keeps a second copy) passes False."""
        if model.n_heads % self.tp or model.kv_heads % self.tp:
            raise PlanError("tp", f"tp={self.tp} must divide the {model.n_heads} attention heads and "
                                  f"{model.kv_heads} kv-heads; valid: tp in {_divisors(math.gcd(model.n_heads, model.kv_heads))}")
        if model.ffn_hidden % self.tp:
            raise PlanError("tp", f"tp={self.tp} must divide ffn_hidden={model.ffn_hidden}")
        stages = self.pp * self.stages_per_rank
        if stages > model.n_layers:
            raise PlanError("pp" if self.pp > model.n_layers else "vstages",
                            f"pp x vstages = {stages} pipeline stages but the model has {model.n_layers} "
                            f"layers; valid: at most {model.n_layers} stages")
        if runtime and self.pp > 1 and model.tie_embeddings:
            raise PlanError("pp", "pp > 1 needs separate input and output embeddings, and this model ties "
                                  "them; use tp or dp for it")

    def check_batch(self, global_batch: int) -> None:
        """The global batch must split evenly into dp replicas x mb micro-batches."""
        if global_batch % (self.dp * self.mb):
            n = self.dp * self.mb
            raise PlanError(
                "dp" if global_batch % self.dp else "mb",
                f"{global_batch} is not divisible by dp x mb = {self.dp} x {self.mb} = {n}; "
                f"valid: a multiple of {n} such as {max(n, global_batch // n * n)} or {(global_batch // n + 1) * n}",
                field="train.global_batch",
            )

    def describe(self) -> str:
        """Short human form, e.g. ``dp=2 tp=2 sp zero=3 mb=2``."""
        parts = [f"dp={self.dp}"]
        parts += [f"tp={self.tp}"] + (["sp"] if self.sp else []) if self.tp > 1 else []
        if self.pp > 1:
            parts += [f"pp={self.pp}", self.schedule] + ([f"vstages={self.stages_per_rank}"] if self.stages_per_rank > 1 else [])
        parts += [f"zero={self.zero}"] if self.zero else []
        parts += [f"mb={self.mb}"] if self.mb > 1 else []
        parts += [f"recompute={self.recompute}"] if self.recompute != "none" else []
        parts += [f"avg_every={self.avg_every}"] if self.avg_every else []
        parts += [f"avg_groups={self.avg_groups}"] if self.avg_groups else []
        parts += [self.precision] if self.precision != "auto" else []
        return " ".join(parts)

    def spec(self) -> str:
        """The ``--plan`` SPEC that reproduces this plan (defaults left out, degrees always given)."""
        default = Plan()
        return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.to_dict().items()
                        if v != getattr(default, k) or k in ("dp", "tp", "pp"))

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# --- the pipeline's stages: one split for the runtime and the performance model ------------------

def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Layer indices of each stage: n_layers + 2 units (embedding, layers, head) spread evenly."""
    bounds = [0]
    for k in range(1, n_stages):
        bounds.append(min(max(round(k * (n_layers + 2) / n_stages) - 1, k), n_layers - (n_stages - k)))
    bounds.append(n_layers)
    return [range(bounds[k], bounds[k + 1]) for k in range(n_stages)]


def stage_ids(pp: int, vstages: int, rank: int) -> list[int]:
    """The pipeline stages that pipeline rank ``rank`` holds: ``rank, rank + pp, rank + 2 pp, ...``
    (``vstages`` of them, ``pp * vstages`` stages in all)."""
    return [rank + k * pp for k in range(vstages)]


def rank_layers(n_layers: int, pp: int, vstages: int = 1,
                split: Callable[[int, int], list[range]] = stage_layers) -> list[list[range]]:
    """The layers each pipeline rank holds, stage by stage: ``rank_layers(L, pp, v)[r][k]`` is the
    ``k``-th stage of rank ``r`` (stage ``r + k pp`` of :func:`stage_layers`). Stage 0 (on rank 0)
    also holds the embedding, the last stage (on rank ``pp - 1``) the final norm and output."""
    stages = split(n_layers, pp * vstages)
    return [[stages[s] for s in stage_ids(pp, vstages, r)] for r in range(pp)]
