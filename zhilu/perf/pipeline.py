"""Pipeline schedules: the layers each rank holds, the bubble, and micro-batches in flight.

``gpipe`` runs all forwards then all backwards; ``1f1b`` interleaves them after a warm-up
of ``p - 1`` forwards (Narayanan et al. 2021); ``interleaved`` gives each device ``v``
chunks of layers, which divides the bubble by ``v`` at the cost of ``v`` times the
point-to-point traffic. Which layers a stage holds is :func:`zhilu.plan.stage_layers`, the
runtime's own split, grouped by rank as the runtime groups them (:func:`zhilu.plan.rank_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zhilu.errors import ZhiluError
from zhilu.plan import SCHEDULES, rank_layers, stage_layers

__all__ = ["SCHEDULES", "RankGroup", "balanced_stage_layers", "bubble_fraction", "even_stage_layers", "in_flight",
           "pipeline_seconds", "rank_groups", "splits"]


def bubble_fraction(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle time over useful time for equal stages: ``(p - 1) / (m * v)``."""
    return (pp - 1) / (micro_batches * virtual_stages)


def even_stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Megatron-LM's split: ``n_layers / n_stages`` layers on every stage (they must divide)."""
    if n_layers % n_stages:
        raise ZhiluError("pp", f"an even split needs the {n_layers} layers to divide into pp x vstages = "
                               f"{n_stages} stages")
    q = n_layers // n_stages
    return [range(k * q, (k + 1) * q) for k in range(n_stages)]


def balanced_stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """DeepSpeed's uniform split (``partition_uniform`` in deepspeed/runtime/utils.py of current
    releases): ``n_layers // n_stages`` layers a stage, the first ``n_layers % n_stages`` stages
    one more."""
    q, extra = divmod(n_layers, n_stages)
    bounds = [k * q + min(k, extra) for k in range(n_stages + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(n_stages)]


# Software.stage_split -> the split
splits = {"zhilu": stage_layers, "even": even_stage_layers, "balanced": balanced_stage_layers}


@dataclass(frozen=True)
class RankGroup:
    """Pipeline ranks that hold as many layers and the same ends: they cost the same.

    ``ranks``: the ranks, lowest first (it holds the most micro-batches in flight); ``layers``:
    the layers each holds; ``chunks``: the lowest rank's layers per stage
    (``rank_layers(...)[ranks[0]]``); ``embedding``: it holds stage 0; ``output``: it holds the
    last stage (with one rank, both)."""

    ranks: tuple[int, ...]
    layers: int
    chunks: tuple[int, ...]
    embedding: bool
    output: bool

    @property
    def first(self) -> int:
        return self.ranks[0]

    @property
    def count(self) -> int:
        return len(self.ranks)


def rank_groups(n_layers: int, pp: int, vstages: int = 1, split: str = "zhilu") -> tuple[RankGroup, ...]:
    """The ranks of a pipeline of ``pp`` ranks with ``vstages`` stages each, grouped by what they
    hold (:func:`zhilu.plan.rank_layers` with the ``split`` of :data:`splits`), lowest rank first."""
    ranks = rank_layers(n_layers, pp, vstages, splits[split])
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for r, chunks in enumerate(ranks):
        key = (sum(len(c) for c in chunks), r == 0, r == pp - 1)
        groups.setdefault(key, []).append(r)
    return tuple(RankGroup(tuple(rs), layers, tuple(len(c) for c in ranks[rs[0]]), emb, out)
                 for (layers, emb, out), rs in sorted(groups.items(), key=lambda kv: kv[1][0]))


def pipeline_seconds(rank_seconds: Sequence[float], micro_batches: int, virtual_stages: int = 1,
                     counts: Sequence[int] | None = None) -> float:
    """Time of ``m`` micro-batches through pipeline ranks whose per-micro-batch times are given
    (``counts``: how many ranks take each time; default one each).

    The slowest rank sets the pace of the steady state; the other ranks' time appears once, in
    the fill and drain, divided by the virtual stages of an interleaved schedule:
    ``m * t_max + (sum_i t_i - t_max) / v``. For ``p`` equal ranks this is
    ``t (m + (p - 1) / v)``, the bubble of :func:`bubble_fraction`.
    """
    slowest = max(rank_seconds)
    total = sum(rank_seconds) if counts is None else sum(t * n for t, n in zip(rank_seconds, counts))
    return micro_batches * slowest + (total - slowest) / virtual_stages


def in_flight(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1, rank: int = 0) -> float:
    """Micro-batches whose activations rank ``rank`` holds at its peak, in units of its layers.

    GPipe holds all ``m``; 1F1B ``p - rank``; interleaved 1F1B on the first rank
    ``p (1 + (p - 1) / (p v))`` (Korthikanti et al. 2022, Sec. 4.2.3); all capped by ``m``.
    """
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(micro_batches)
    if schedule == "1f1b":
        return float(min(pp - rank, micro_batches))
    chunks = (virtual_stages - 1) * pp + 2 * (pp - 1 - rank) + 1  # chunk forwards before the first backward
    return min(chunks, micro_batches * virtual_stages) / virtual_stages
