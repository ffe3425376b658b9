"""``zhilu bench`` and report.html: every strategy runs and is tabulated beside its prediction;
the reports of a run and of the bench, rendered by a real headless Chromium (Debian's package,
which .ci/run installs), draw every plot with no network and no console message; screenshots
are left for people to look at (tests/artifacts/report-*.png)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import MICRO, zhilu
from zhilu.launch.bench import strategies

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"
RUN_PLOTS = ("Loss", "Step time, measured and predicted", "Where a step's time goes", "Memory per rank",
             "One step per rank")
BENCH_PLOTS = ("Step time by strategy", "Where a step's time goes", "Peak memory per rank", "Training loss by strategy")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with no network: every request off the page fails."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``zhilu bench`` of a small model: 4 steps of each strategy on 2 processes, predicted on
    the CPU preset (so --plan auto need not calibrate this machine first)."""
    out = tmp_path_factory.mktemp("bench") / "bench"
    result = zhilu("bench", "--steps", "4", "--warmup", "1", "--out", str(out), "--",
                   *MICRO, "--global-batch", "8",
                   "--parallel.hardware", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out


def test_bench_runs_every_strategy_and_tabulates_it_beside_the_prediction(bench: Path) -> None:
    table = json.loads((bench / "bench.json").read_text())
    assert [r["strategy"] for r in table] == [name for name, _, _ in strategies(2)]
    assert not [r for r in table if "failed" in r], [r.get("failed") for r in table]
    one = table[0]
    assert one["speedup"] == 1 and one["nproc"] == 1
    for r in table:
        assert r["p10_s"] <= r["median_s"] <= r["p90_s"] and r["predicted_s"] > 0 and r["peak_mib"] > 0
        assert r["error"] == pytest.approx(r["predicted_s"] / r["median_s"] - 1)
        assert r["efficiency"] == pytest.approx(one["median_s"] / r["median_s"] / r["nproc"])
    printed = (bench / "stdout.txt").read_text()
    for r in table:
        assert f"{r['strategy']:<16} {r['plan']:<24} {r['median_s'] * 1e3:8.1f}" in printed


def test_bench_takes_a_users_model_and_says_why_a_strategy_cannot_run_it(tmp_path: Path) -> None:
    """examples/my_model.py declares no tensor-parallel plan, no pipeline and no transformer
    shape: those rows say so in the model's own error line; every other strategy runs (predicted
    on the CPU preset, so that the machine need not be calibrated first)."""
    out = tmp_path / "bench"
    result = zhilu("bench", "--model", "examples/my_model.py:spec", "--steps", "3", "--warmup", "1", "--out", str(out),
                   "--", "--parallel.hardware", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    table = {r["strategy"]: r for r in json.loads((out / "bench.json").read_text())}
    failed = {name: r["failed"] for name, r in table.items() if "failed" in r}
    assert sorted(failed) == ["PP 1F1B", "TP", "auto"], failed
    assert all(why.startswith("error: parallel.plan:") for why in failed.values()), failed
    assert all(r["median_s"] > 0 for name, r in table.items() if name not in failed)
    assert (out / "report.html").is_file() and "could not run: " in (out / "report.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it: "
                                              "apt-get install chromium)")
@pytest.mark.parametrize("which", ["run", "bench"])
def test_a_report_draws_every_plot_in_a_browser(bench: Path, which: str) -> None:
    if which == "run":
        result = zhilu("report", str(bench / "ddp"))
        assert result.returncode == 0, result.stderr
        page, plots = bench / "ddp" / "report.html", RUN_PLOTS
    else:
        page, plots = bench / "report.html", BENCH_PLOTS
    html = page.read_text()
    assert not re.search(r"""<script[^>]+src=|<link[^>]+href=["']?http""", html)  # nothing fetched
    for title in plots:
        assert title in html, title

    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="plot-container plotly"') == len(plots)
    assert dom.stdout.count('class="main-svg"') >= 2 * len(plots)  # plotly drew each one's SVG layers
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = chromium("--window-size=1100,2600", f"--screenshot={ARTIFACTS / f'report-{which}.png'}", page.as_uri())
    assert shot.returncode == 0 and (ARTIFACTS / f"report-{which}.png").stat().st_size > 10_000, shot.stderr[-2000:]


def test_bench_refuses_an_output_it_cannot_use_before_running_anything(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for out, why in ((tmp_path / "file", "a file, not a directory"), (tmp_path / "file" / "sub", "which is a file"),
                     (tmp_path / "full", "is not empty")):
        result = zhilu("bench", "--out", str(out))
        assert result.returncode == 2 and result.stderr.startswith("error: --out:") and why in result.stderr, \
            result.stderr
        assert result.stdout == ""
    assert (tmp_path / "file").read_text() == "x" and [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_bench_refuses_a_model_or_flag_zhilu_train_refuses_before_running_anything(tmp_path: Path) -> None:
    for args, why in ((["--model", "nope"], "error: model.name: unknown model 'nope'"),
                      (["--", "--train.lr", "-1"], "error: train.lr:")):
        out = tmp_path / "bench"
        result = zhilu("bench", "--out", str(out), *args)
        assert result.returncode == 2 and result.stderr.startswith(why), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == "" and not out.exists()


def test_report_of_a_directory_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    result = zhilu("report", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: RUN_DIR"), result.stderr
    assert not (tmp_path / "report.html").exists()


def test_report_to_a_path_it_cannot_write_is_a_clear_error(bench: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for out, why in ((tmp_path, "is a directory"), (tmp_path / "file" / "r.html", "is not a directory")):
        result = zhilu("report", str(bench / "ddp"), "--out", str(out))
        assert result.returncode == 2 and result.stderr.startswith("error: --out:") and why in result.stderr, \
            result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
