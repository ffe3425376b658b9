"""Plan: how one training step is laid out over the processes.

A plan SPEC is comma-separated ``key=value`` (``zhilu train --plan dp=2,zero=3``):

==========  =================================================================
dp, tp, pp  data-, tensor- and pipeline-parallel degrees; their product is the world size
zero        0 = DDP replicas; 1, 2, 3 = ZeRO stages on the dp axis through FSDP2
mb          micro-batches per step (gradient accumulation; pipeline micro-batches)
schedule    pipeline schedule: gpipe, 1f1b, interleaved
recompute   activation recomputation: none, selective, full
avg_every   model averaging (local SGD): average the replicas every H steps; 0 = off
==========  =================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from zhilu.errors import ZhiluError

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
    recompute: str = "none"
    avg_every: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

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
            else:
                try:
                    values[key] = int(text)
                except ValueError:
                    raise ZhiluError("parallel.plan", f"{key}={text!r} must be an integer") from None
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
        unsupported = [f"{k}={getattr(self, k)}" for k, off in (("tp", 1), ("pp", 1), ("avg_every", 0)) if getattr(self, k) != off]
        if self.recompute != "none":
            unsupported.append(f"recompute={self.recompute}")
        if unsupported:
            raise ZhiluError(
                "parallel.plan",
                f"{', '.join(unsupported)} is not available yet; valid today: dp=N with zero=0..3 and mb=K",
            )

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
        """Short human form, e.g. ``dp=2 zero=3 mb=2``."""
        parts = [f"dp={self.dp}"]
        parts += [f"{k}={v}" for k, v in (("tp", self.tp), ("pp", self.pp)) if v > 1]
        parts += [f"zero={self.zero}"] if self.zero else []
        parts += [f"mb={self.mb}"] if self.mb > 1 else []
        return " ".join(parts)

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)
