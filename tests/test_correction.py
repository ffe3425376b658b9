"""The prediction corrected by a run's first steps (zhilu/monitor/correction.py): each group of
the model's terms re-fitted to the measured seconds of the same group."""

import pytest

from zhilu.monitor.correction import STEPS, correct, fitted_on

PREDICTED = {"compute": 1.0, "tp_comm": 1.0, "recompute": 0.0, "pp_comm": 0.5, "bubble": 0.5,
             "dp_comm_exposed": 0.1, "optimizer": 0.2, "other": 0.0}
MEASURED = {"data": 0.05, "forward": 3.0, "backward": 1.0, "pipeline": 2.0, "dp_comm_exposed": 0.3,
            "optimizer": 0.1, "other": 0.05}


def test_each_group_is_scaled_to_what_was_measured_of_it():
    c = correct(PREDICTED, MEASURED)
    assert c.factors == pytest.approx({"compute": 2.0, "recompute": None, "pipeline": 2.0, "dp_comm": 3.0,
                                       "optimizer": 0.5, "other": None})
    # tensor-parallel traffic is measured inside the forward and backward: scaled with the compute
    assert c.breakdown["compute"] == pytest.approx(2.0) and c.breakdown["tp_comm"] == pytest.approx(2.0)
    assert c.breakdown["pp_comm"] == pytest.approx(1.0) and c.breakdown["bubble"] == pytest.approx(1.0)
    assert c.breakdown["other"] == pytest.approx(0.1)  # not predicted: the data wait and the rest, as measured
    assert c.step_time_s == pytest.approx(sum(MEASURED.values()))


def test_it_is_fitted_on_the_first_steps_but_the_one_that_holds_step_1():
    def records(every):
        return [{"step": s, "breakdown": {}} for s in range(every, 3 * STEPS, every)]

    assert [r["step"] for r in fitted_on(records(1))] == list(range(2, STEPS + 1))
    assert [r["step"] for r in fitted_on(records(5))] == [10]
    assert [r["step"] for r in fitted_on(records(10))] == [10]
    assert fitted_on(records(1)[:STEPS - 1]) == []


def test_tensor_parallel_traffic_measured_apart_is_a_group_of_its_own():
    c = correct(PREDICTED, {**MEASURED, "forward": 2.0, "tp_comm": 0.5})
    assert c.factors["compute"] == pytest.approx(3.0) and c.factors["tp_comm"] == pytest.approx(0.5)
    assert c.breakdown["compute"] == pytest.approx(3.0) and c.breakdown["tp_comm"] == pytest.approx(0.5)
