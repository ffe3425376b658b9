"""`zhilu calibrate`: real measurements over a real gloo group, written as a hardware file that plan reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import zhilu
from zhilu import hardware
from zhilu.calibrate import fit_link


def test_two_processes_write_a_hardware_file_that_plan_reads(tmp_path: Path) -> None:
    out = tmp_path / "hw.toml"
    result = zhilu("calibrate", "--nproc", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    c = hardware.load(out)
    d = c.device
    assert c.devices_per_node == 2 and d.synchronous
    assert {p.precision for p in d.matmul} == {"fp32", "bf16"}
    assert all(p.tflops > 0 for p in d.matmul) and d.matmul_tflops["fp32"] > 0
    assert d.attention and all(a.precision == "fp32" for a in d.attention)
    assert d.attention_tflops(256, 32, "fp32") > 0
    assert d.memory_bandwidth_gbps > 0 and d.launch_us > 0
    assert c.intra.name == "gloo-measured" and c.intra.latency_us > 0 and c.intra.bandwidth_gbps > 0

    result = zhilu("plan", "--model", "gpt-tiny", "--seq-len", "256", "--global-batch", "16", "--gpus", "2",
                   "--hardware", str(out), "--precision", "fp32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plans"][0]["step_time_s"] > 0


def test_the_link_fit_recovers_latency_and_bandwidth() -> None:
    n, alpha, bandwidth = 4, 50e-6, 2e9  # 50 us per ring step, 2 GB/s
    rows = []
    for nbytes in (4096, 65536, 1 << 20, 1 << 24):
        for kind, steps, wire in (("all_reduce", 2 * (n - 1), 2 * (n - 1) / n), ("all_gather", n - 1, (n - 1) / n),
                                  ("reduce_scatter", n - 1, (n - 1) / n), ("p2p", 1, 1.0)):
            rows.append({"kind": kind, "bytes": nbytes, "seconds": steps * alpha + wire * nbytes / bandwidth})
    fitted = fit_link(rows, n)
    assert fitted["latency_us"] == pytest.approx(50.0, rel=1e-6)
    assert fitted["bandwidth_gbps"] == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("args, field", [
    (["--nproc", "0", "--out", "OUT/hw.toml"], "nproc"),
    (["--out", "OUT/hw.txt"], "out"),
    (["--out", "/proc/hw.toml"], "out"),  # a folder nobody may write: refused before measuring
    (["--device", "tpu", "--out", "OUT/hw.toml"], "arguments"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], field: str, tmp_path: Path) -> None:
    result = zhilu("calibrate", *(a.replace("OUT", str(tmp_path)) for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {field}") and result.stderr.count("\n") == 1
    assert "calibrating" not in result.stdout and not list(tmp_path.iterdir())  # nothing measured or written
