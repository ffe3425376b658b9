"""Pipeline schedules: the bubble, the layers each rank holds and micro-batches in flight."""

import pytest

from zhilu.errors import ZhiluError
from zhilu.perf.pipeline import (RankGroup, balanced_stage_layers, bubble_fraction, even_stage_layers, in_flight,
                                 pipeline_seconds, rank_groups)


def test_bubble_is_p_minus_1_over_m_and_divided_by_virtual_stages():
    assert bubble_fraction(8, 64) == pytest.approx(7 / 64)
    assert bubble_fraction(8, 64, virtual_stages=3) == pytest.approx(7 / 192)


@pytest.mark.parametrize("v", [1, 2, 4])
def test_equal_stages_take_m_plus_bubble_slots(v):
    t, p, m = 0.5, 4, 8
    assert pipeline_seconds([t] * p, m, v) == pytest.approx(t * m * (1 + bubble_fraction(p, m, v)))


def test_the_slowest_stage_sets_the_pace():
    # last rank 1.5 s (output layer), others 1 s: 8 micro-batches at 1.5 s + the other ranks once
    assert pipeline_seconds([1.0, 1.0, 1.0, 1.5], 8) == pytest.approx(8 * 1.5 + 3.0)


def test_a_single_stage_has_no_bubble():
    assert pipeline_seconds([2.0], 5) == 10.0


def test_ranks_are_grouped_by_what_they_hold():
    # llama3-8b over 4 ranks: zhilu's split counts the embedding and the output layer as a layer each
    assert rank_groups(32, 4) == (RankGroup((0,), 7, (7,), True, False), RankGroup((1, 2), 9, (9,), False, False),
                                  RankGroup((3,), 7, (7,), False, True))
    # Llama 3 405B: one layer fewer on the first and the last stage
    assert [(g.first, g.count, g.layers) for g in rank_groups(126, 16)] == [(0, 1, 7), (1, 14, 8), (15, 1, 7)]
    # interleaved: rank r holds stages r, r + pp, ...
    assert rank_groups(8, 2, 2) == (RankGroup((0,), 4, (1, 3), True, False), RankGroup((1,), 4, (3, 1), False, True))
    assert rank_groups(12, 1) == (RankGroup((0,), 12, (12,), True, True),)


def test_megatron_splits_the_layers_evenly():
    assert [len(r) for r in even_stage_layers(128, 64)] == [2] * 64
    assert [(g.count, g.layers) for g in rank_groups(96, 8, 3, "even")] == [(1, 12), (6, 12), (1, 12)]
    with pytest.raises(ZhiluError) as e:
        even_stage_layers(10, 4)
    assert e.value.field == "pp"


def test_deepspeed_splits_the_layers_uniformly_the_first_stages_taking_one_more():
    assert [len(r) for r in balanced_stage_layers(70, 12)] == [6] * 10 + [5] * 2  # BLOOM's 70 layers on 12 stages
    assert balanced_stage_layers(70, 12)[-1] == range(65, 70)
    assert [len(r) for r in balanced_stage_layers(10, 4)] == [3, 3, 2, 2]
    assert balanced_stage_layers(72, 12) == even_stage_layers(72, 12)
    assert [(g.count, g.layers) for g in rank_groups(10, 4, 1, "balanced")] == [(1, 3), (1, 3), (1, 2), (1, 2)]


def test_micro_batches_in_flight_per_schedule():
    assert in_flight("gpipe", 4, 16) == 16
    assert in_flight("1f1b", 4, 16) == 4
    assert in_flight("1f1b", 4, 16, rank=3) == 1
    assert in_flight("1f1b", 8, 2) == 2
    # interleaved, first stage: p (1 + (p - 1) / (p v)) (Korthikanti et al. 2022, Sec. 4.2.3)
    assert in_flight("interleaved", 8, 64, 3) == pytest.approx(8 * (1 + 7 / 24))
    assert in_flight("1f1b", 1, 16) == 1
