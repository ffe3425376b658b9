"""Hardware presets, the achieved-rate model of a device, and hardware files."""

from dataclasses import replace

import pytest

from zhilu import hardware
from zhilu.errors import ZhiluError
from zhilu.hardware import Device, Link, MatmulPoint, PRESETS, cluster, fit_matmul_tflops

DEV = Device("test", memory_gib=10, memory_bandwidth_gbps=1000, power_w=100, peak_tflops={"bf16": 100, "fp32": 10},
             matmul_tflops={"bf16": 50.0, "fp32": 5.0}, compute_units=4)


def test_the_presets_the_design_names():
    assert {"a100-40gb", "a100-80gb", "h100-sxm", "h200", "cpu"} <= set(PRESETS)


def test_a_large_product_runs_at_the_sustained_rate_plus_its_output_store():
    m = n = k = 4096
    expected = 2 * m * n * k / 50e12 + 2 * 2 * m * n / 1000e9
    assert DEV.gemm_seconds(m, n, k) == pytest.approx(expected)


def test_efficiency_falls_with_a_short_reduction_and_a_small_output():
    big = 2 * 4096 ** 3 / DEV.gemm_seconds(4096, 4096, 4096)
    short_k = 2 * 4096 * 4096 * 256 / DEV.gemm_seconds(4096, 4096, 256)
    tiny = 2 * 128 * 128 * 512 / DEV.gemm_seconds(128, 128, 512)  # one output tile for four units
    assert big > short_k and big > tiny
    # one 128 x 256 output tile keeps one of the four units busy: too short a reduction to split
    assert tiny == pytest.approx(2 * 128 * 128 * 512 / (2 * 128 * 128 * 512 / 12.5e12 + 4 * 128 * 128 / 1e12))


def test_a_small_output_with_a_long_reduction_is_split_over_the_units():
    assert hardware.k_splits(128, 128, 4096, 1, 4) == 4  # fills the four units (512 or more of k each)
    assert hardware.k_splits(128, 128, 1024, 1, 4) == 2  # at least 512 of the reduction per split
    assert hardware.k_splits(4096, 4096, 8192, 1, 132) == 1  # 512 tiles fill the device
    flops = 2 * 128 * 128 * 4096
    # all four units busy, the output stored, and four fp32 partial tiles written and read back
    expected = flops / 50e12 + 4 * 128 * 128 / 1e12 + 2 * 4 * 128 * 128 * 4 / 1e12
    assert DEV.gemm_seconds(128, 128, 4096) == pytest.approx(expected)


def test_a_product_runs_in_whole_waves_of_tiles():
    assert hardware.wave_fill(4096, 4096, 1, 132) == pytest.approx(512 / (4 * 132))  # 512 tiles: 3.9 waves
    assert hardware.wave_fill(128, 256, 1, 4) == 0.25
    assert hardware.wave_fill(1024, 1024, 1, 32) == 1.0


def test_a_thin_product_is_memory_bound():
    m, n, k = 8, 8192, 8192
    assert DEV.gemm_seconds(m, n, k) == pytest.approx(2 * (m * k + k * n + m * n) / 1000e9)


def test_the_fit_recovers_the_rate_of_a_measured_product():
    t = DEV.gemm_seconds(8192, 8192, 8192)
    point = MatmulPoint(8192, 8192, 8192, 2 * 8192 ** 3 / t / 1e12)
    assert fit_matmul_tflops((point,), 1000, launch_us=10, compute_units=4) == pytest.approx(50.0)


def test_launch_bound_measurements_do_not_set_the_rate():
    with pytest.raises(ZhiluError) as e:
        fit_matmul_tflops((MatmulPoint(256, 256, 256, 1.6),), 4230, launch_us=21.5)
    assert e.value.field == "hardware.device.matmul"


def test_the_h200_preset_is_fitted_to_the_measured_products():
    h200 = PRESETS["h200"].device
    hot = 2 * 8192 ** 3 / h200.gemm_seconds(8192, 8192, 8192) / 1e12
    assert hot == pytest.approx(684.5, rel=1e-6)  # the repeat of 8192^3, once the chip was hot
    assert 600 < 2 * 16384 * 6144 * 2048 / h200.gemm_seconds(16384, 6144, 2048) / 1e12 < 700  # measured 648.8


def test_attention_rate_grows_with_sequence_and_head_size():
    h200 = PRESETS["h200"].device
    assert h200.attention_tflops(4096, 128) == pytest.approx(479.1 / 2, rel=1e-6)
    assert h200.attention_tflops(8192, 128) > h200.attention_tflops(2048, 128) > h200.attention_tflops(2048, 64)
    assert PRESETS["v100-32gb"].device.attention_tflops(2048, 128) is None  # no fused kernel


def test_the_attention_fit_is_not_extrapolated_to_higher_rates():
    h200 = PRESETS["h200"].device  # measured up to 4096 and head size 128
    edge = h200.attention_tflops(4096, 128)
    assert h200.attention_tflops(8192, 128) == h200.attention_tflops(32768, 256) == edge
    assert h200.attention_tflops(1024, 128) < h200.attention_tflops(2048, 128) < edge  # the fit applies below


def test_synchronous_jobs_run_at_the_slowest_device():
    a100 = PRESETS["a100-80gb"].device
    assert a100.slowest_of(1) is a100
    r8, r1024 = (a100.slowest_of(n).matmul_tflops["bf16"] for n in (8, 1024))
    assert r1024 < r8 < a100.matmul_tflops["bf16"]


def test_a_cluster_is_sized_in_whole_nodes():
    c = cluster("h200", 32)
    assert (c.devices, c.nodes, c.devices_per_node) == (32, 4, 8)
    assert cluster("h200", 4).devices_per_node == 4
    with pytest.raises(ZhiluError) as e:
        cluster("h200", 12)
    assert e.value.field == "gpus"
    with pytest.raises(ZhiluError) as e:
        cluster("h200", 0)
    assert e.value.field == "gpus"


def test_an_unknown_name_names_the_valid_ones():
    with pytest.raises(ZhiluError) as e:
        cluster("tpu-v5")
    assert e.value.field == "hardware" and "h100-sxm" in e.value.message


def test_a_missing_file(tmp_path):
    with pytest.raises(ZhiluError) as e:
        cluster(str(tmp_path / "nowhere.toml"))
    assert e.value.field == "hardware" and "no such hardware file" in e.value.message


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_hardware_file_round_trips(tmp_path, name):
    path = tmp_path / "hw.toml"
    hardware.save(PRESETS[name], path)
    assert hardware.load(path) == PRESETS[name]


def test_a_file_of_measured_products_gets_its_rate_fitted():
    data = hardware.to_dict(replace(PRESETS["h200"], intra=Link("shm", 20.0, 5.0)))
    del data["device"]["matmul_tflops"]["bf16"]
    rebuilt = hardware.from_dict(data)
    assert rebuilt.device.matmul_tflops["bf16"] == pytest.approx(
        fit_matmul_tflops(PRESETS["h200"].device.matmul, 4230.2, 21.5, 132))


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["device"].update(memory_gib=-1), "hardware.device.memory_gib"),
    (lambda d: d["device"].pop("memory_bandwidth_gbps"), "hardware.device.memory_bandwidth_gbps"),
    (lambda d: d["device"]["peak_tflops"].update(fp8=1000), "hardware.device.peak_tflops"),
    (lambda d: d["links"].pop("inter"), "hardware.links.inter"),
    (lambda d: d["links"]["intra"].update(compute_share=2), "hardware.links.intra.compute_share"),
    (lambda d: d["device"]["matmul"].append({"m": 1, "n": 1, "k": 0, "tflops": 1}), "hardware.device.matmul.k"),
    (lambda d: d.pop("device"), "hardware.device"),
    (lambda d: d["device"]["matmul_tflops"].pop("fp32"), "hardware.device.matmul_tflops.fp32"),  # nothing to fit
])
def test_a_bad_field_names_itself(edit, field):
    data = hardware.to_dict(PRESETS["a100-80gb"])
    edit(data)
    with pytest.raises(ZhiluError) as e:
        hardware.from_dict(data)
    assert e.value.field == field


def test_a_file_that_is_not_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("device = [")
    with pytest.raises(ZhiluError) as e:
        hardware.load(path)
    assert e.value.field == "hardware"


def test_attention_measured_at_a_precision_is_used_at_it_and_scaled_to_the_other():
    cpu = replace(DEV, attention=(hardware.AttentionPoint(256, 64, 0.03, "fp32"),))
    assert cpu.attention_tflops(256, 64, "fp32") == pytest.approx(0.03)
    assert cpu.attention_tflops(256, 64, "bf16") == pytest.approx(0.03 * 50.0 / 5.0)  # as the products scale


def test_a_calibrated_cpu_file_round_trips(tmp_path):
    cpu = replace(PRESETS["cpu"], device=replace(PRESETS["cpu"].device, tp_layer_us=1500.0, tp_layer_s_per_gb=2.5,
                                                 tp_ends_us=800.0,
                                                 attention=(hardware.AttentionPoint(128, 32, 0.02, "fp32"),)))
    path = tmp_path / "cpu.toml"
    hardware.save(cpu, path)
    assert hardware.load(path) == cpu and not (tmp_path / "cpu.toml.tmp").exists()
