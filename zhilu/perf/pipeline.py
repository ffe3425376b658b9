"""Pipeline schedules: layers per stage, the bubble, and micro-batches in flight.

``gpipe`` runs all forwards then all backwards; ``1f1b`` interleaves them after a warm-up
of ``p - 1`` forwards (Narayanan et al. 2021); ``interleaved`` gives each device ``v``
chunks of layers, which divides the bubble by ``v`` at the cost of ``v`` times the
point-to-point traffic.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def bubble_fraction(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle time over useful time for equal stages: ``(p - 1) / (m * v)``."""
    return (pp - 1) / (micro_batches * virtual_stages)


def stage_layers(layers: int, pp: int) -> tuple[int, int, int]:
    """Layers on the first, a middle (the largest) and the last stage.

    Layers are spread as evenly as possible; when they do not divide, the stages with one
    layer fewer go last and first, which carry the output layer and the embedding (the
    balancing Llama 3 and torchtitan use).
    """
    q, r = divmod(layers, pp)
    if pp == 1:
        return layers, layers, layers
    short = pp - r  # stages with q layers
    big = q + 1 if r else q
    last = q
    first = q if short >= 2 else big
    return first, big, last


def pipeline_seconds(first: float, middle: float, last: float, pp: int, micro_batches: int,
                     virtual_stages: int = 1) -> float:
    """Time of ``m`` micro-batches through ``p`` stages whose per-micro-batch times are given.

    The slowest stage sets the pace of the steady state; the other stages' time appears
    once, in the fill and drain, divided by the virtual stages of an interleaved schedule:
    ``m * t_max + (sum_i t_i - t_max) / v``. For equal stages this is ``t (m + (p - 1) / v)``,
    the bubble of :func:`bubble_fraction`.
    """
    if pp == 1:
        return micro_batches * middle
    slowest = max(first, middle, last)
    total = first + last + (pp - 2) * middle
    return micro_batches * slowest + (total - slowest) / virtual_stages


def in_flight(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1, rank: int = 0) -> float:
    """Micro-batches whose activations stage ``rank`` holds at its peak, in units of its layers.

    GPipe holds all ``m``; 1F1B ``p - rank``; interleaved 1F1B on the first stage
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
