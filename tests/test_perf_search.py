"""The search: every valid plan, ranked by predicted step time among those that fit, and fast."""

import time

import pytest

from zhilu.errors import ZhiluError
from zhilu.hardware import PRESETS
from zhilu.models.presets import GPTConfig, preset
from zhilu.perf.flops import Transformer
from zhilu.perf.search import best_plan, divisors, search
from zhilu.perf.step import Plan, StepModel

# The 1T GPT of Narayanan et al. 2021 and Korthikanti et al. 2022
ONE_T = Transformer(GPTConfig(n_layers=128, hidden=25600, n_heads=160, ffn_hidden=68352, vocab_size=51200,
                              max_seq_len=2048), 2048)
LLAMA = Transformer(preset("llama3-8b"), 4096)


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(1) == [1]


def test_searching_every_plan_for_a_1t_model_on_3072_gpus_takes_under_a_second():
    start = time.perf_counter()
    found = search(ONE_T, PRESETS["a100-80gb"].sized(3072), 1536)
    assert time.perf_counter() - start < 1.0
    assert len(found) > 100 and found[0].fits


def test_evaluating_a_plan_takes_microseconds():
    steps = StepModel(ONE_T, PRESETS["a100-80gb"].sized(3072), 1536)
    plan = Plan(24, 8, 16, 1, 1, "interleaved", 8, "selective", True)
    steps.estimate(plan)  # per-layer costs are computed once and cached
    start = time.perf_counter()
    for _ in range(1000):
        steps.estimate(plan)
    assert (time.perf_counter() - start) / 1000 < 100e-6


def test_results_fit_and_come_fastest_first():
    found = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64)
    times = [e.step_time_s for e in found]
    assert times == sorted(times) and all(e.fits for e in found)
    for e in found:
        p = e.plan
        assert p.dp * p.tp * p.pp == 16 and p.tp <= 8 and 64 % (p.dp * p.micro_batch) == 0


def test_the_best_plan_is_at_least_as_fast_as_any_plan_evaluated_by_hand():
    cluster = PRESETS["h100-sxm"].sized(16)
    best = search(LLAMA, cluster, 64, top=1)[0]
    steps = StepModel(LLAMA, cluster, 64)
    for plan in (Plan(16, 1, 1, 1, 1), Plan(8, 2, 1, 1, 2, sequence_parallel=True), Plan(2, 8, 1, 0, 4, "1f1b", 1,
                                                                                          "selective", True)):
        e = steps.evaluate(plan)
        assert not e.fits or best.step_time_s <= e.step_time_s


def test_given_degrees_are_kept_and_the_rest_searched():
    found = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed={"tp": 4, "pp": 2})
    assert {(e.plan.tp, e.plan.pp, e.plan.dp) for e in found} == {(4, 2, 2)}
    assert len({e.plan.micro_batch for e in found}) > 1


def test_a_fully_given_plan_is_evaluated_exactly():
    fixed = {"dp": 2, "tp": 8, "pp": 1, "zero": 1, "micro_batch": 4, "schedule": "1f1b", "recompute": "full",
             "sequence_parallel": True, "precision": "bf16"}
    (only,) = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed=fixed)
    assert only.plan == Plan(2, 8, 1, 1, 4, "1f1b", 1, "full", True, "bf16")


def test_recompute_is_only_used_when_needed():
    # an 8B model on 8 H100: plans that fit without recomputation need none
    found = search(LLAMA, PRESETS["h100-sxm"].sized(8), 8, fixed={"dp": 8, "zero": 3})
    assert found[0].plan.recompute == "none"


def test_a_pinned_schedule_is_kept():
    found = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed={"schedule": "gpipe"})
    assert {e.plan.schedule for e in found} == {"gpipe"}
    interleaved = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed={"schedule": "interleaved"})
    assert all(e.plan.pp > 1 and e.plan.virtual_stages > 1 for e in interleaved)


def test_nothing_fits():
    with pytest.raises(ZhiluError) as e:
        search(Transformer(preset("llama3-70b"), 8192), PRESETS["a100-40gb"].sized(1), 8)
    assert e.value.field == "plan" and "GiB" in e.value.message


@pytest.mark.parametrize("fixed,field", [({"tp": 3}, "tp"), ({"tp": 16}, "tp"), ({"pp": 64}, "pp"),
                                         ({"dp": 5}, "dp"), ({"dp": 2, "tp": 2, "pp": 2}, "dp"),
                                         ({"tp": 0}, "tp"), ({"warp": 2}, "plan")])
def test_impossible_pinned_degrees(fixed, field):
    with pytest.raises(ZhiluError) as e:
        search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed=fixed)
    assert e.value.field == field


def test_best_plan_for_zhilu_train():
    e = best_plan(preset("gpt-tiny"), seq_len=256, global_batch=16, gpus=2, hardware="cpu")
    assert e.fits and e.plan.dp * e.plan.tp * e.plan.pp == 2
    assert e.plan_spec().startswith(f"dp={e.plan.dp},tp={e.plan.tp},pp={e.plan.pp}")
