"""One training step of a plan: composition of the terms, validation, and how choices trade off."""

import pytest

from zhilu.errors import ZhiluError
from zhilu.hardware import PRESETS
from zhilu.models.presets import preset
from zhilu.perf.flops import Transformer
from zhilu.perf.pipeline import bubble_fraction
from zhilu.perf.step import BREAKDOWN, StepModel
from zhilu.plan import Plan as TrainPlan

LLAMA = Transformer(preset("llama3-8b"), 4096)


def Plan(**fields):  # noqa: N802 - the one zhilu.plan.Plan, in bf16 unless given
    return TrainPlan(**{"precision": "bf16", **fields})


def steps(devices=8, batch=64, hw="h100-sxm", model=LLAMA):
    return StepModel(model, PRESETS[hw].sized(devices), batch)


def test_the_breakdown_adds_up_to_the_step():
    for plan in (Plan(dp=8, zero=3, mb=4), Plan(dp=2, tp=2, pp=2, zero=1, mb=32, schedule="interleaved", vstages=4,
                                                recompute="selective", sp=True),
                 Plan(tp=8, recompute="full", mb=8, sp=True)):
        e = steps().evaluate(plan)
        assert set(e.breakdown) == set(BREAKDOWN)
        assert sum(e.breakdown.values()) == pytest.approx(e.step_time_s)
        assert min(e.breakdown.values()) >= 0


def test_one_device_spends_its_step_computing_and_stepping_the_optimizer():
    e = steps(devices=1, batch=4).evaluate(Plan(mb=4))
    assert e.breakdown["tp_comm"] == e.breakdown["pp_comm"] == e.breakdown["dp_comm_exposed"] == 0
    assert e.breakdown["bubble"] == 0
    # four micro-batches of one sequence: four times the work of one
    one = steps(devices=1, batch=1).evaluate(Plan(mb=1))
    assert e.breakdown["compute"] == pytest.approx(4 * one.breakdown["compute"])


def test_throughput_and_mfu_follow_from_the_step_time():
    e = steps().evaluate(Plan(dp=8, zero=1, mb=4))
    tokens = 64 * 4096
    assert e.tokens_per_s == pytest.approx(tokens / e.step_time_s)
    flops = LLAMA.model_flops_per_token * tokens / e.step_time_s / 8
    assert e.model_tflops_per_gpu == pytest.approx(flops / 1e12)
    assert e.mfu == pytest.approx(flops / 989e12) and e.peak_tflops == 989


def test_equal_stages_show_the_textbook_bubble():
    # 12 layers over 4 stages, 3 each; a small vocabulary keeps the embedding and output layer cheap
    m = Transformer(preset("llama3-8b", n_layers=12, vocab_size=256), 4096)
    e = StepModel(m, PRESETS["h100-sxm"].sized(4), 32).evaluate(Plan(pp=4, mb=32))
    busy = e.step_time_s - e.breakdown["bubble"] - e.breakdown["optimizer"]
    assert e.breakdown["bubble"] / busy == pytest.approx(bubble_fraction(4, 32), rel=0.05)


def test_interleaving_shrinks_the_bubble():
    s = steps()
    plain = s.evaluate(Plan(pp=8, mb=64, schedule="1f1b"))
    interleaved = s.evaluate(Plan(pp=8, mb=64, schedule="interleaved", vstages=4))
    assert interleaved.breakdown["bubble"] < plain.breakdown["bubble"] / 3


def test_recompute_trades_time_for_memory():
    s = steps()
    none, sel, full = (s.evaluate(Plan(dp=8, zero=3, mb=4, recompute=r)) for r in ("none", "selective", "full"))
    assert none.step_time_s < sel.step_time_s < full.step_time_s
    assert full.memory.activations < none.memory.activations / 3  # the logits stay
    assert full.breakdown["recompute"] > sel.breakdown["recompute"] > 0 == none.breakdown["recompute"]


def test_zero_stages_trade_traffic_for_memory():
    s = steps()
    mems = [s.evaluate(Plan(dp=8, zero=z, mb=4)).memory for z in range(4)]
    assert mems[0].optimizer == 8 * mems[1].optimizer
    assert mems[1].gradients == 8 * mems[2].gradients
    assert mems[2].weights == 8 * mems[3].weights
    assert [m.total for m in mems] == sorted((m.total for m in mems), reverse=True)


def test_sequence_parallelism_saves_activations_and_elementwise_time():
    s = steps()
    tp, sp = (s.evaluate(Plan(tp=8, mb=16, sp=v)) for v in (False, True))
    assert sp.memory.activations < tp.memory.activations
    assert sp.breakdown["compute"] < tp.breakdown["compute"]


def test_fp32_is_slower_and_bigger_than_mixed_precision():
    s = steps()
    bf16, fp32 = (s.evaluate(Plan(dp=8, zero=3, mb=4, precision=p)) for p in ("bf16", "fp32"))
    assert fp32.step_time_s > 5 * bf16.step_time_s
    assert fp32.memory.activations == pytest.approx(2 * bf16.memory.activations, rel=0.05)


def test_too_little_memory_does_not_fit():
    e = StepModel(Transformer(preset("llama3-70b"), 4096), PRESETS["a100-40gb"].sized(8), 8).evaluate(
        Plan(dp=8, zero=0, mb=1))
    assert not e.fits and e.memory_gib_per_device > 39.4


@pytest.mark.parametrize("plan,field", [
    (Plan(dp=4), "dp"),  # 4 != 8 devices
    (Plan(dp=8, mb=3), "mb"),  # 8 sequences per replica
    (Plan(dp=2, pp=4, mb=2, schedule="interleaved", vstages=4), "mb"),  # 2 micro-batches < pp
    (Plan(pp=8, mb=64, schedule="interleaved", vstages=8), "vstages"),  # 64 chunks, 32 layers
    (Plan(dp=8, zero=5), "zero"),
    (Plan(dp=8, schedule="zigzag"), "schedule"),
    (Plan(dp=8, recompute="some"), "recompute"),
    (Plan(dp=8, precision="fp8"), "precision"),
    (Plan(dp=8, precision="auto"), "precision"),  # resolved for a device first
    (Plan(pp=8, mb=64, schedule="interleaved", vstages=1), "vstages"),
    (Plan(dp=8, vstages=2), "schedule"),
    (Plan(dp=8, sp=True), "sp"),
])
def test_an_invalid_plan_names_the_field(plan, field):
    with pytest.raises(ZhiluError) as e:
        steps().evaluate(plan)
    assert e.value.field == field


def test_tensor_parallelism_stays_in_a_node():
    with pytest.raises(ZhiluError) as e:  # 16 heads, 16 kv-heads: the model allows it, the node does not
        steps(devices=16, model=Transformer(preset("gpt-1.3b"), 2048)).evaluate(Plan(tp=16, mb=64))
    assert e.value.field == "tp" and "node" in e.value.message


def test_heads_not_divisible_by_tp():
    m = Transformer(preset("gpt-tiny"), 256)  # 6 heads
    with pytest.raises(ZhiluError) as e:
        StepModel(m, PRESETS["h100-sxm"].sized(4), 8).evaluate(Plan(tp=4))
    assert e.value.field == "tp" and "6 attention heads" in e.value.message


def test_plan_spec_for_zhilu_train():
    e = steps().evaluate(Plan(dp=2, tp=2, pp=2, zero=1, mb=32, schedule="interleaved", vstages=4, sp=True,
                              recompute="selective"))
    spec = "dp=2,tp=2,pp=2,zero=1,mb=32,schedule=interleaved,vstages=4,sp=true,recompute=selective,precision=bf16"
    assert e.plan_spec() == spec and e.micro_batch == 1  # 64 sequences over dp=2: 32 micro-batches of one
    assert TrainPlan.parse(spec, 8) == e.plan == TrainPlan(
        dp=2, tp=2, pp=2, zero=1, mb=32, schedule="interleaved", vstages=4, sp=True, recompute="selective",
        precision="bf16")


def test_foreach_adamw_moves_92_bytes_per_parameter_where_fused_moves_42():
    from dataclasses import replace
    from zhilu.perf.software import FOREACH_ADAMW_BYTES, OPTIMIZER_BYTES, ZHILU
    plan = Plan(dp=8, zero=3, mb=4)
    fused = steps().evaluate(plan).breakdown["optimizer"]
    foreach = StepModel(LLAMA, PRESETS["h100-sxm"].sized(8), 64, replace(ZHILU, foreach_adamw=True)).evaluate(plan)
    assert FOREACH_ADAMW_BYTES == 92 and OPTIMIZER_BYTES["bf16"] == 42
    assert foreach.breakdown["optimizer"] == pytest.approx(fused * 92 / 42)


def test_fsdp_exposes_the_embedding_gather_and_its_last_reduce_scatter():
    from dataclasses import replace
    from zhilu.perf.comm import collective_seconds
    from zhilu.perf.software import ZHILU
    cluster = PRESETS["h100-sxm"].sized(8)
    plan = Plan(dp=8, zero=3, mb=4)
    for together, blocks in ((False, 1), (True, 2)):  # torchtitan's root unit holds the output layer too
        table = blocks * LLAMA.vocab * LLAMA.hidden
        once = collective_seconds("all_gather", table * 2, 8, 8, cluster) + collective_seconds(
            "reduce_scatter", table * 4, 8, 8, cluster)
        s = StepModel(LLAMA, cluster, 64, replace(ZHILU, fsdp_output_with_embedding=together))
        layer = s.layer(1, False, 2, "none", "bf16")
        _, _, first = s.traffic.layer_seconds(plan, s.sharding(plan), layer, 8, cluster.intra.compute_share)
        assert first == pytest.approx(once)


def test_overlapped_tensor_parallel_products_run_in_chunks_of_t_rows():
    from dataclasses import replace
    from zhilu.perf.software import ZHILU
    cluster = PRESETS["h100-sxm"].sized(8)
    plain = StepModel(LLAMA, cluster, 8, ZHILU).layer(8, True, 1, "none", "bf16")
    overlap = StepModel(LLAMA, cluster, 8, replace(ZHILU, tp_overlap=True)).layer(8, True, 1, "none", "bf16")
    dev = StepModel(LLAMA, cluster, 8, ZHILU).device
    chunked = sum(8 * dev.gemm_seconds(4096 // 8, n, k) for g in LLAMA.gemm_groups(8, False) for n, k in g)
    whole = sum(dev.gemm_seconds(4096, n, k) for g in LLAMA.gemm_groups(8, False) for n, k in g)
    assert chunked > whole  # a chunk of 512 rows fills fewer waves
    assert overlap.forward - plain.forward == pytest.approx(chunked - whole)


def test_a_cpu_pays_for_issuing_kernels_on_top_of_running_them():
    from dataclasses import replace

    tiny = Transformer(preset("gpt-tiny"), 256)
    cpu = PRESETS["cpu"].sized(1)
    queued = replace(cpu, device=replace(cpu.device, synchronous=False))
    layer = StepModel(tiny, cpu, 8).layer(1, False, 8, "none", "fp32")
    assert layer.other > 0  # kernels x launch_us, in full
    assert StepModel(tiny, queued, 8).layer(1, False, 8, "none", "fp32").other == 0  # hidden under the kernels


def test_dtensor_overhead_adds_per_layer_and_per_byte_of_activation():
    from dataclasses import replace

    tiny = Transformer(preset("gpt-tiny"), 256)
    cpu = PRESETS["cpu"].sized(2)
    slow = replace(cpu, device=replace(cpu.device, tp_layer_us=10_000.0, tp_layer_s_per_gb=2.0))

    def other(c, b):
        return StepModel(tiny, c, 16).layer(2, True, b, "none", "fp32").other

    activation_gb = 8 * 256 * 192 * 4 / 1e9
    assert other(slow, 8) - other(cpu, 8) == pytest.approx(0.010 + 2.0 * activation_gb)
    assert other(slow, 1) - other(cpu, 1) == pytest.approx(0.010 + 2.0 * activation_gb / 8)
    no_tp = [StepModel(tiny, c, 16).layer(1, False, 8, "none", "fp32").other for c in (slow, cpu)]
    assert no_tp[0] == no_tp[1]  # without tensor parallelism, no DTensor


def test_fsdp_traffic_is_exposed_on_a_cpu_and_zero2_reduces_every_micro_batch():
    tiny = Transformer(preset("gpt-tiny"), 256)
    s = StepModel(tiny, PRESETS["cpu"].sized(2), 16)
    one, four = (s.evaluate(Plan(dp=2, zero=2, mb=n, precision="fp32")).breakdown["dp_comm_exposed"] for n in (1, 4))
    assert four == pytest.approx(4 * one)  # one reduce-scatter per micro-batch, none hidden
    zero1 = s.evaluate(Plan(dp=2, zero=1, mb=4, precision="fp32")).breakdown["dp_comm_exposed"]
    assert zero1 < four


def test_each_fsdp_collective_pays_the_calibrated_wait_per_ring_step():
    from dataclasses import replace

    tiny = Transformer(preset("gpt-tiny"), 256)
    cpu = PRESETS["cpu"].sized(4)
    waits = replace(cpu, device=replace(cpu.device, fsdp_step_us=1000.0))

    def exposed(c, zero):
        plan = Plan(dp=4, zero=zero, mb=2, precision="fp32")
        return StepModel(tiny, c, 16).evaluate(plan).breakdown["dp_comm_exposed"]

    micro_batches, ring_steps = 2, 3
    # ZeRO-3: two gathers and a reduce-scatter per layer and micro-batch, the embedding's gather and reduce-scatter
    assert exposed(waits, 3) - exposed(cpu, 3) == pytest.approx(
        micro_batches * (3 * tiny.layers + 2) * ring_steps * 1e-3)
    # ZeRO-1: one gather and one reduce-scatter per unit (the layers and the root) and step
    assert exposed(waits, 1) - exposed(cpu, 1) == pytest.approx(2 * (tiny.layers + 1) * ring_steps * 1e-3)
