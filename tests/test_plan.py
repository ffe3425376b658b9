"""The one Plan: its validator, its precision, its SPEC, and the one stage split that the
runtime and the performance model share."""

from __future__ import annotations

import pytest

from zhilu.errors import ZhiluError
from zhilu.hardware import PRESETS
from zhilu.models.presets import GPTConfig, preset
from zhilu.perf.flops import Transformer
from zhilu.perf.memory import stage_params, state_bytes
from zhilu.perf.pipeline import in_flight
from zhilu.perf.step import StepModel
from zhilu.plan import Plan, PlanError, rank_layers, stage_layers


def runtime_ranks(n_layers: int, pp: int, v: int) -> list[list[range]]:
    """What each pipeline rank builds, as zhilu/parallel/pipeline_parallel.py's Pipeline does it:
    stage_layers over pp * v stages, rank r holding stages r, r + pp, ..."""
    ranges = stage_layers(n_layers, pp * v)
    return [[ranges[i] for i in [pp_rank + k * pp for k in range(v)]] for pp_rank in range(pp)]


def test_every_layer_lands_on_exactly_one_stage():
    for n in range(1, 129):
        for stages in range(1, min(n, 32) + 1):
            ranges = stage_layers(n, stages)
            assert [i for r in ranges for i in r] == list(range(n)) and all(len(r) >= 1 for r in ranges)


def test_the_performance_model_holds_the_layers_the_runtime_runs():
    cluster = PRESETS["h100-sxm"].sized(8)
    for n in range(1, 129):
        steps = StepModel(Transformer(GPTConfig(n_layers=n, hidden=64, n_heads=4, ffn_hidden=128), 64), cluster, 8)
        for pp in range(1, 9):
            for v in range(1, 5):
                if pp * v > n:
                    continue
                expected = runtime_ranks(n, pp, v)
                assert rank_layers(n, pp, v) == expected
                counts = [sum(len(c) for c in chunks) for chunks in expected]
                seen: set[int] = set()
                for g, params in steps.ranks(1, pp, v):
                    for r in g.ranks:  # every rank of a group holds what the runtime gives that rank
                        assert g.layers == counts[r] and g.embedding == (r == 0) and g.output == (r == pp - 1)
                    assert g.chunks == tuple(len(c) for c in expected[g.first])  # and the stages of its first
                    assert g.first == min(r for r in range(pp) if (counts[r], r == 0, r == pp - 1) ==
                                          (g.layers, g.embedding, g.output))
                    assert params == stage_params(steps.model, 1, counts[g.first], g.embedding, g.output, pp)
                    seen.update(g.ranks)
                assert seen == set(range(pp))


def test_llama3_8b_over_4_ranks_is_timed_and_sized_by_the_runtimes_7_9_9_7():
    assert [len(r) for r in stage_layers(32, 4)] == [7, 9, 9, 7]
    # a small vocabulary keeps the output layer from making the last rank the slowest
    model = Transformer(preset("llama3-8b", vocab_size=256), 4096)
    steps = StepModel(model, PRESETS["h100-sxm"].sized(8), 16)
    plan = Plan(dp=2, pp=4, mb=8, precision="bf16")
    e = steps.evaluate(plan)
    layer = steps.layer(1, False, 1, "none", "bf16")
    assert e.breakdown["compute"] == pytest.approx(8 * 9 * layer.compute)  # the slowest rank: 9 layers
    _, tail = steps.ends(1, False, 1, "bf16")
    totals = []
    for rank, layers in enumerate((7, 9, 9, 7)):  # memory: the rank that needs the most, of the runtime's
        params = stage_params(model, 1, layers, rank == 0, rank == 3, 4)
        states = sum(state_bytes(params, "bf16", 0, 2))
        totals.append(states + in_flight("1f1b", 4, 8, 1, rank) * layers * layer.saved + (tail.memory if rank == 3 else 0))
    assert e.memory.total == pytest.approx(max(totals))


def test_precision_auto_is_resolved_per_device():
    plan = Plan(dp=2)
    assert plan.precision == "auto"
    assert plan.resolved("cuda").precision == "bf16" and plan.resolved("cpu").precision == "fp32"
    assert Plan(precision="fp32").resolved("cuda").precision == "fp32"
    assert Plan.parse("dp=2,precision=bf16", 2).precision == "bf16"


def test_the_spec_reproduces_the_plan():
    plan = Plan(dp=2, tp=2, pp=2, zero=1, mb=4, schedule="interleaved", vstages=2, sp=True, precision="bf16")
    assert plan.spec() == "dp=2,tp=2,pp=2,zero=1,mb=4,schedule=interleaved,vstages=2,sp=true,precision=bf16"
    assert Plan.parse(plan.spec(), 8) == plan
    assert Plan(dp=4).spec() == "dp=4,tp=1,pp=1"


def test_the_micro_batch_size_follows_from_the_count():
    assert Plan(dp=2, mb=4).micro_batch(64) == 8


@pytest.mark.parametrize("plan, world, key", [
    (Plan(dp=3), 2, "dp"), (Plan(zero=4), 1, "zero"), (Plan(pp=2, mb=1), 2, "mb"),
    (Plan(precision="fp16"), 1, "precision"), (Plan(sp=True), 1, "sp"), (Plan(dp=2, zero=1, avg_every=2), 2, "avg_every"),
    (Plan(pp=2, mb=3, schedule="interleaved"), 2, "mb"), (Plan(vstages=2), 1, "schedule"),
])
def test_a_bad_plan_names_the_plan_field(plan: Plan, world: int, key: str):
    with pytest.raises(PlanError) as e:
        plan.validate(world)
    assert e.value.field == "parallel.plan" and e.value.key == key and isinstance(e.value, ZhiluError)


def test_the_model_and_the_batch_checks_name_their_fields():
    tiny = preset("gpt-tiny")  # 6 heads, 4 layers
    for plan, key in ((Plan(tp=4), "tp"), (Plan(pp=8, mb=8), "pp"), (Plan(pp=2, mb=2, schedule="interleaved",
                                                                          vstages=4), "vstages")):
        with pytest.raises(PlanError) as e:
            plan.check_model(tiny)
        assert e.value.key == key
    with pytest.raises(PlanError) as e:
        Plan(pp=2, mb=2).check_model(preset("gpt2-124m"))  # tied embeddings: zhilu's runtime cannot split them
    assert e.value.key == "pp"
    Plan(pp=2, mb=2).check_model(preset("gpt2-124m"), runtime=False)  # the performance model of Megatron can
    with pytest.raises(PlanError) as e:
        Plan(dp=2, mb=3).check_batch(8)
    assert e.value.field == "train.global_batch" and e.value.key == "mb"
