"""The model against the published runs in benchmarks/published/ (benchmarks/published.py).

Targets of issue 4: step time median error <= 5% and max <= 15%; memory median <= 10%.
"""

import importlib.util
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("published", ROOT / "benchmarks" / "published.py")
published = sys.modules["published"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(published)


def test_step_time_errors_meet_the_targets():
    med, worst, n = published.summary(published.step_rows(published.DEFAULT_DIR))
    assert n >= 40
    assert med <= 0.05 and worst <= 0.15, f"median {med:.1%}, max {worst:.1%}"


def test_step_time_errors_do_not_regress():
    # median 4.6%, max 12.3% when last measured (docs/perf_model.md, section 9)
    med, worst, _ = published.summary(published.step_rows(published.DEFAULT_DIR))
    assert med <= 0.047 and worst <= 0.124, f"median {med:.1%}, max {worst:.1%}"


def test_memory_errors_meet_the_target():
    med, _, n = published.summary(published.memory_rows(published.DEFAULT_DIR))
    assert n >= 12 and med <= 0.10, f"median {med:.1%}"


def test_only_features_the_model_lacks_are_left_out():
    rows = published.step_rows(published.DEFAULT_DIR)
    for r in rows:
        if r.predicted is None:
            assert r.note.startswith("not modelled: ") and ("float8" in r.note or "context parallel" in r.note)


def test_every_llmfoundry_row_but_float8_is_modelled():
    rows = published.foundry_rows(published.DEFAULT_DIR)
    skipped = [r for r in rows if r.predicted is None]
    assert len(rows) == 284 and all(r.note == "not modelled: float8 matmuls" for r in skipped) and len(skipped) == 7


def test_llmfoundry_errors_do_not_regress():
    # median 7.3%, max 36.8% when first measured (docs/perf_model.md, section 9): runs the model
    # was not developed on
    med, worst, _ = published.summary(published.foundry_rows(published.DEFAULT_DIR))
    assert med <= 0.074 and worst <= 0.369, f"median {med:.1%}, max {worst:.1%}"


def test_the_error_bands_of_zhilu_plan_are_what_the_benchmark_measures():
    from zhilu.perf import error_bands

    root = published.DEFAULT_DIR
    ratios = published.band_ratios(published.step_rows(root) + published.foundry_rows(root))
    assert error_bands.RATIOS == ratios, "run python benchmarks/published.py --write-bands"
    assert published.BANDS_FILE.read_text() == published.bands_source(ratios)
