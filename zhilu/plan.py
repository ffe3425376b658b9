"""Plan: how one training step is laid out over the processes.

A plan SPEC is comma-separated ``key=value`` (``zhilu train --plan dp=2,zero=3``):

==========  =================================================================
dp, tp, pp  data-, tensor- and pipeline-parallel degrees; their product is the world size
zero        0 = DDP replicas; 1, 2, 3 = ZeRO stages on the dp axis through FSDP2
mb          micro-batches per step (gradient accumulation; pipeline micro-batches)
schedule    pipeline schedule: gpipe, 1f1b, interleaved
vstages     pipeline stages per rank (interleaved: default 2; others: 1)
sp          sequence parallelism in the norm regions (needs tp > 1): true or false
recompute   activation recomputation: none, selective, full
avg_every   model averaging (local SGD): average the replicas every H steps; 0 = off
==========  =================================================================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from zhilu.errors import ZhiluError

if TYPE_CHECKING:
    from zhilu.models.presets import GPTConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")


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

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        return self.vstages or (2 if self.schedule == "interleaved" and self.pp > 1 else 1)

    @classmethod
    def parse(cls, spec: str, world_size: int) -> Plan:
        """Parse SPEC; degrees left out are filled so that dp * tp * pp = world_size."""
        values: dict[str, int | str] = {}
        names = [f.name for f in fields(cls)]
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ZhiluError("parallel.plan", f"cannot read {item!r}; valid: comma-separated key=value with keys {', '.join(names)}")
            if key in values:
                raise ZhiluError("parallel.plan", f"{key} is given twice")
            if key in ("schedule", "recompute"):
                values[key] = text.strip()
            elif key == "sp":
                if text.strip().lower() not in ("true", "false", "1", "0"):
                    raise ZhiluError("parallel.plan", f"sp={text!r}; valid: true or false")
                values[key] = text.strip().lower() in ("true", "1")
            else:
                try:
                    values[key] = int(text)
                except ValueError:
                    raise ZhiluError("parallel.plan", f"{key}={text!r} must be an integer") from None
        if "mb" not in values and int(values.get("pp", 1)) > 1:
            values["mb"] = 2 * int(values["pp"])  # enough micro-batches to keep every stage busy
        if "dp" not in values:
            rest = int(values.get("tp", 1)) * int(values.get("pp", 1))
            values["dp"] = world_size // rest if rest > 0 and world_size % rest == 0 else 0
        plan = cls(**values)  # type: ignore[arg-type]
        plan.validate(world_size)
        return plan

    def validate(self, world_size: int) -> None:
        for key in ("dp", "tp", "pp", "mb"):
            if getattr(self, key) < 1:
                raise ZhiluError("parallel.plan", f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.world_size != world_size:
            raise ZhiluError(
                "parallel.plan",
                f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.world_size} but there are {world_size} processes; "
                f"make the product {world_size} or change --nproc",
            )
        if self.zero not in (0, 1, 2, 3):
            raise ZhiluError("parallel.plan", f"zero={self.zero}; valid: 0 (DDP), 1, 2, 3 (ZeRO stages)")
        if self.schedule not in SCHEDULES:
            raise ZhiluError("parallel.plan", f"schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.recompute not in RECOMPUTE:
            raise ZhiluError("parallel.plan", f"recompute={self.recompute!r}; valid: {', '.join(RECOMPUTE)}")
        if self.avg_every < 0:
            raise ZhiluError("parallel.plan", f"avg_every must be 0 (off) or a positive number of steps, got {self.avg_every}")
        if self.vstages < 0:
            raise ZhiluError("parallel.plan", f"vstages must be positive, got {self.vstages}")
        if self.schedule == "interleaved" and self.pp > 1 and self.stages_per_rank < 2:
            raise ZhiluError("parallel.plan", "the interleaved schedule needs vstages >= 2 stages per rank")
        if self.schedule != "interleaved" and self.stages_per_rank > 1:
            raise ZhiluError("parallel.plan", f"vstages={self.vstages} needs schedule=interleaved")
        if self.pp > 1 and self.mb < self.pp:
            raise ZhiluError("parallel.plan", f"mb={self.mb} micro-batches cannot fill {self.pp} pipeline stages; "
                             f"valid: mb >= pp = {self.pp}")
        if self.schedule == "interleaved" and self.pp > 1 and self.mb % self.pp:
            raise ZhiluError("parallel.plan", f"the interleaved schedule needs mb to be a multiple of pp={self.pp}, got mb={self.mb}")
        if self.sp and self.tp == 1:
            raise ZhiluError("parallel.plan", "sp=true shards the norm regions across the tp ranks and needs tp > 1")
        if self.avg_every and (self.zero or self.tp > 1 or self.pp > 1):
            raise ZhiluError("parallel.plan", "avg_every (model averaging) trains whole replicas: use it with dp only, zero=0")

    def check_model(self, model: "GPTConfig") -> None:
        """Degrees must fit the model's shape."""
        if model.n_heads % self.tp or model.kv_heads % self.tp:
            raise ZhiluError("parallel.plan", f"tp={self.tp} must divide the {model.n_heads} attention heads and "
                             f"{model.kv_heads} kv-heads; valid: tp in {_divisors(math.gcd(model.n_heads, model.kv_heads))}")
        if model.ffn_hidden % self.tp:
            raise ZhiluError("parallel.plan", f"tp={self.tp} must divide ffn_hidden={model.ffn_hidden}")
        stages = self.pp * self.stages_per_rank
        if stages > model.n_layers:
            raise ZhiluError("parallel.plan", f"pp x vstages = {stages} pipeline stages but the model has {model.n_layers} "
                             f"layers; valid: at most {model.n_layers} stages")
        if self.pp > 1 and model.tie_embeddings:
            raise ZhiluError("parallel.plan", "pp > 1 needs separate input and output embeddings, and this model ties "
                             "them; use tp or dp for it")

    def check_batch(self, global_batch: int) -> None:
        """The global batch must split evenly into dp replicas x mb micro-batches."""
        if global_batch % (self.dp * self.mb):
            n = self.dp * self.mb
            raise ZhiluError(
                "train.global_batch",
                f"{global_batch} is not divisible by dp x mb = {self.dp} x {self.mb} = {n}; "
                f"valid: a multiple of {n} such as {max(n, global_batch // n * n)} or {(global_batch // n + 1) * n}",
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
        return " ".join(parts)

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
