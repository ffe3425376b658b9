"""Pipeline schedules: the bubble, stage sizes and micro-batches in flight."""

import pytest

from zhilu.perf.pipeline import bubble_fraction, in_flight, pipeline_seconds, stage_layers


def test_bubble_is_p_minus_1_over_m_and_divided_by_virtual_stages():
    assert bubble_fraction(8, 64) == pytest.approx(7 / 64)
    assert bubble_fraction(8, 64, virtual_stages=3) == pytest.approx(7 / 192)


@pytest.mark.parametrize("v", [1, 2, 4])
def test_equal_stages_take_m_plus_bubble_slots(v):
    t, p, m = 0.5, 4, 8
    assert pipeline_seconds(t, t, t, p, m, v) == pytest.approx(t * m * (1 + bubble_fraction(p, m, v)))


def test_the_slowest_stage_sets_the_pace():
    # last stage 1.5 s (output layer), others 1 s: 8 micro-batches at 1.5 s + the other stages once
    assert pipeline_seconds(1.0, 1.0, 1.5, 4, 8) == pytest.approx(8 * 1.5 + 3.0)


def test_a_single_stage_has_no_bubble():
    assert pipeline_seconds(2.0, 2.0, 2.0, 1, 5) == 10.0


def test_uneven_layers_leave_the_short_stages_at_the_ends():
    assert stage_layers(128, 64) == (2, 2, 2)
    assert stage_layers(126, 16) == (7, 8, 7)  # Llama 3 405B: one layer fewer on the first and last stage
    assert stage_layers(10, 4) == (2, 3, 2)
    assert stage_layers(7, 4) == (2, 2, 1)
    assert stage_layers(12, 1) == (12, 12, 12)


def test_micro_batches_in_flight_per_schedule():
    assert in_flight("gpipe", 4, 16) == 16
    assert in_flight("1f1b", 4, 16) == 4
    assert in_flight("1f1b", 4, 16, rank=3) == 1
    assert in_flight("1f1b", 8, 2) == 2
    # interleaved, first stage: p (1 + (p - 1) / (p v)) (Korthikanti et al. 2022, Sec. 4.2.3)
    assert in_flight("interleaved", 8, 64, 3) == pytest.approx(8 * (1 + 7 / 24))
    assert in_flight("1f1b", 1, 16) == 1
