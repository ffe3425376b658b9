"""The search: every valid plan, ranked by predicted step time among those that fit, and fast."""


import pytest

from zhilu.errors import ZhiluError
from zhilu.hardware import PRESETS
from zhilu.models.presets import GPTConfig, preset
from zhilu.perf.flops import Transformer
from zhilu.perf.search import best_plan, divisors, search
from zhilu.perf.software import stack
from zhilu.perf.step import StepModel
from zhilu.plan import Plan as TrainPlan


def Plan(**fields):  # noqa: N802 - the one zhilu.plan.Plan, in bf16 unless given
    return TrainPlan(**{"precision": "bf16", **fields})

# The 1T GPT of Narayanan et al. 2021 and Korthikanti et al. 2022
ONE_T = Transformer(GPTConfig(n_layers=128, hidden=25600, n_heads=160, ffn_hidden=68352, vocab_size=51200,
                              max_seq_len=2048), 2048)
LLAMA = Transformer(preset("llama3-8b"), 4096)


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(1) == [1]


def test_searching_every_plan_for_a_1t_model_on_3072_gpus():
    found = search(ONE_T, PRESETS["a100-80gb"].sized(3072), 1536)
    assert len(found) > 100 and found[0].fits


def test_plans_share_cached_layer_costs():
    """A search evaluates thousands of plans; each layer shape is costed once (speed is
    benchmarks' business, not a timed test's)."""
    steps = StepModel(ONE_T, PRESETS["a100-80gb"].sized(3072), 1536)
    plan = Plan(dp=24, tp=8, pp=16, zero=1, mb=64, schedule="interleaved", vstages=8, recompute="selective", sp=True)
    first = steps.estimate(plan)
    assert len(steps.costs._layers) == 1 and len(steps.costs._ends) == 1
    assert steps.estimate(plan) == first and len(steps.costs._layers) == 1
    steps.estimate(Plan(dp=48, tp=8, pp=8, zero=1, mb=32, recompute="selective", sp=True))
    assert len(steps.costs._layers) == 1  # same tp, micro-batch size and recompute: the same layer cost


def test_results_fit_and_come_fastest_first():
    found = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64)
    times = [e.step_time_s for e in found]
    assert times == sorted(times) and all(e.fits for e in found)
    for e in found:
        p = e.plan
        assert p.dp * p.tp * p.pp == 16 and p.tp <= 8 and e.micro_batch * p.mb * p.dp == 64


def test_the_best_plan_is_at_least_as_fast_as_any_plan_evaluated_by_hand():
    cluster = PRESETS["h100-sxm"].sized(16)
    best = search(LLAMA, cluster, 64, top=1)[0]
    steps = StepModel(LLAMA, cluster, 64)
    for plan in (Plan(dp=16, zero=1, mb=4), Plan(dp=8, tp=2, zero=1, mb=4, sp=True),
                 Plan(dp=2, tp=8, mb=8, recompute="selective", sp=True)):
        e = steps.evaluate(plan)
        assert not e.fits or best.step_time_s <= e.step_time_s


def test_given_degrees_are_kept_and_the_rest_searched():
    found = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed={"tp": 4, "pp": 2})
    assert {(e.plan.tp, e.plan.pp, e.plan.dp) for e in found} == {(4, 2, 2)}
    assert len({e.micro_batch for e in found}) > 1


def test_a_fully_given_plan_is_evaluated_exactly():
    fixed = {"dp": 2, "tp": 8, "pp": 1, "zero": 1, "micro_batch": 4, "schedule": "1f1b", "recompute": "full",
             "sp": True, "precision": "bf16"}
    (only,) = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed=fixed)
    assert only.plan == Plan(dp=2, tp=8, zero=1, mb=8, recompute="full", sp=True) and only.micro_batch == 4
    counted = dict(fixed, mb=8)
    del counted["micro_batch"]
    assert search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed=counted)[0].plan == only.plan


def test_recompute_is_only_used_when_needed():
    # an 8B model on 8 H100: plans that fit without recomputation need none
    found = search(LLAMA, PRESETS["h100-sxm"].sized(8), 8, fixed={"dp": 8, "zero": 3})
    assert found[0].plan.recompute == "none"


def test_a_pinned_schedule_is_kept():
    found = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed={"schedule": "gpipe"})
    assert {e.plan.schedule for e in found} == {"gpipe"}
    interleaved = search(LLAMA, PRESETS["h100-sxm"].sized(16), 64, fixed={"schedule": "interleaved"})
    assert all(e.plan.pp > 1 and e.plan.stages_per_rank > 1 for e in interleaved)


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


def test_every_plan_is_sized_and_timed_for_the_zero_behaviour_that_runs():
    from dataclasses import replace

    from zhilu.perf.memory import state_bytes

    for model, hw, devices, batch in ((LLAMA, "h100-sxm", 16, 64), (Transformer(preset("gpt-1.3b"), 2048), "a100-40gb",
                                                                     32, 128), (Transformer(preset("gpt-tiny"), 256),
                                                                                "cpu", 4, 16)):
        steps = StepModel(model, PRESETS[hw].sized(devices), batch)
        found = search(model, steps.cluster, batch)
        assert any(e.plan.pp > 1 and e.plan.dp > 1 for e in found)
        for e in found:
            p, s = e.plan, e.sharding
            assert s == steps.sharding(p)  # what the traffic was timed for
            params = [params for g, params in steps.ranks(p.tp, p.pp, p.stages_per_rank if p.pp > 1 else 1)]
            held = [state_bytes(n, p.precision, s.held, p.dp) for n in params]
            assert (e.memory.weights, e.memory.gradients, e.memory.optimizer) in held  # sized for the same
            if p.pp > 1 and p.dp > 1:  # torch.distributed.pipelining: reduced once, after the last backward
                assert s.held == min(p.zero, 1) and s.passes == 1 and s.after_backward
                assert s.layer_gathers == (1 if p.zero == 3 else 0)  # ZeRO-3 gathers each layer again per micro-batch
            elif p.dp > 1:
                assert s.held == p.zero and s.layer_gathers == (2 if p.zero == 3 else 0)

    # a pipeline under ZeRO-3 holds what ZeRO-1 holds, and gathers every layer once more per micro-batch
    steps = StepModel(LLAMA, PRESETS["h100-sxm"].sized(16), 64)
    zero1 = steps.evaluate(Plan(dp=4, pp=4, zero=1, mb=16))
    zero3 = steps.evaluate(replace(zero1.plan, zero=3))
    assert zero3.memory == zero1.memory and zero3.sharding.held == 1
    assert zero3.breakdown["dp_comm_exposed"] > zero1.breakdown["dp_comm_exposed"]
    assert zero3.step_time_s > zero1.step_time_s


def test_mfu_is_model_flops_over_the_peak_and_never_above_one():
    from zhilu.mfu import mfu

    for model, hw, devices, batch in ((LLAMA, "h100-sxm", 16, 64), (ONE_T, "a100-80gb", 3072, 1536),
                                      (Transformer(preset("gpt-tiny"), 256), "cpu", 2, 16)):
        for e in search(model, PRESETS[hw].sized(devices), batch, require_fit=False):
            assert 0 < e.mfu <= 1
            assert e.mfu == pytest.approx(mfu(model.model_flops_per_token, e.tokens_per_s, devices, e.peak_tflops))
            assert e.peak_tflops == PRESETS[hw].device.peak_tflops[e.plan.precision]


def test_a_tensor_parallel_group_never_straddles_two_nodes():
    """tp is the innermost mesh dimension: on 8-GPU nodes a group of 6 would span two nodes, which
    the model would time at NVLink speed."""
    found = search(Transformer(GPTConfig(n_layers=24, hidden=3072, n_heads=24, ffn_hidden=12288, vocab_size=51200,
                                         max_seq_len=2048), 2048), PRESETS["h100-sxm"].sized(48), 96, top=10_000)
    assert {e.plan.tp for e in found} <= {1, 2, 4, 8}
    with pytest.raises(ZhiluError) as e:
        search(LLAMA, PRESETS["h100-sxm"].sized(48), 96, fixed={"tp": 6})
    assert e.value.field == "tp" and "node" in e.value.message


def test_a_stack_is_offered_only_what_it_can_run():
    """Megatron-LM of 2020 had no sequence parallelism, interleaved schedule, selective recompute
    or distributed optimizer; Megatron-DeepSpeed's pipeline refuses ZeRO-2/3."""
    old = search(ONE_T, PRESETS["a100-80gb"].sized(512), 512, software=stack("megatron-lm-2020"), top=10_000)
    assert old and all(not e.plan.sp and e.plan.schedule != "interleaved" and e.plan.recompute != "selective"
                       and e.plan.zero == 0 for e in old)
    ds = search(ONE_T, PRESETS["a100-80gb"].sized(512), 512, software=stack("deepspeed"), top=10_000)
    assert all(e.plan.zero <= 1 for e in ds if e.plan.pp > 1) and any(e.plan.pp > 1 for e in ds)
    for fixed, field in (({"sp": True, "tp": 8}, "sp"), ({"recompute": "selective"}, "recompute"),
                         ({"zero": 1, "dp": 512, "tp": 1, "pp": 1}, "zero")):
        with pytest.raises(ZhiluError) as e:
            search(ONE_T, PRESETS["a100-80gb"].sized(512), 512, software=stack("megatron-lm-2020"), fixed=fixed)
        assert e.value.field == field and "megatron-lm-2020" in e.value.message
