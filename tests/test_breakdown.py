"""The measured step breakdown, specified by injection: delays added to one term at a time in
a real run (``ZHILU_FAULTS`` delay and slow, zhilu/training/faults.py) show up in that term by
the amount injected and nowhere else; a rank slowed in its own compute is named the straggler.
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from conftest import MICRO, train
from zhilu.config import JobConfig
from zhilu.monitor.breakdown import STRAGGLER_STEPS
from zhilu.models.registry import spec_of

DELAY_MS = 30
PHASE = 15  # steps per phase; the delays start at phase boundaries and stay on
LOGGED = ["--train.log_every", "5", "--train.eval_every", "0", "--global-batch", "8"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def phase(recs: list[dict], k: int, rank: int | None = None) -> dict[str, float]:
    """Per term, the median over the logged intervals wholly inside phase ``k`` (from 0), of
    the aggregate over ranks or of one ``rank``'s own terms."""
    inside = [r for r in recs if k * PHASE + 5 < r["step"] <= (k + 1) * PHASE]
    assert len(inside) == PHASE // 5 - 1, [r["step"] for r in recs]
    split = [r["breakdown"] if rank is None else r["breakdown_by_rank"][rank] for r in inside]
    terms = split[0].keys() | split[-1].keys()
    return {t: statistics.median(b.get(t, 0.0) for b in split) for t in terms}


def assert_only_grows(before: dict[str, float], after: dict[str, float], term: str, seconds: float) -> None:
    """``term`` grew by ``seconds`` within max(10%, 5 ms); every other term stayed within
    max(10% of it, 5 ms)."""
    grown = after[term] - before.get(term, 0.0)
    assert abs(grown - seconds) <= max(0.1 * seconds, 0.005), (term, grown, before, after)
    for other in before.keys() - {term}:
        change = after.get(other, 0.0) - before[other]
        assert abs(change) <= max(0.1 * before[other], 0.005), (other, change, before, after)


def assert_terms_sum_to_step_time(recs: list[dict]) -> None:
    for r in recs:
        assert sum(r["breakdown"].values()) == pytest.approx(r["step_time_s"], rel=0.05), r


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DDP ranks; from step 16 on each sleeps in the data term, from 31 in the optimizer,
    from 46 as its gradient all-reduce completes."""
    faults = ";".join(f"delay:rank={r}:term={term}:ms={DELAY_MS}:step={k * PHASE + 1}"
                      for r in (0, 1) for k, term in ((1, "data"), (2, "optimizer"), (3, "dp_comm")))
    out = train(tmp_path_factory.mktemp("ddp") / "run", *LOGGED, "--steps", str(4 * PHASE), "--nproc", "2",
                "--plan", "dp=2", env={"ZHILU_FAULTS": faults})
    return out


@pytest.fixture(scope="module")
def ddp_run(ddp_out: Path) -> list[dict]:
    return records(ddp_out)


@pytest.mark.parametrize("k, term", [(1, "data"), (2, "optimizer"), (3, "dp_comm_exposed")])
def test_a_delay_shows_in_its_own_term_only(ddp_run: list[dict], k: int, term: str) -> None:
    assert_only_grows(phase(ddp_run, k - 1), phase(ddp_run, k), term, DELAY_MS / 1e3)


def test_terms_sum_to_the_step_time_and_predictions_sit_beside_them(ddp_run: list[dict]) -> None:
    assert_terms_sum_to_step_time(ddp_run)
    for r in ddp_run:
        assert set(r["predicted"]) >= {"compute", "dp_comm_exposed", "optimizer", "bubble"}
        assert r["predicted_step_time_s"] > 0 and r["eta_s"] >= 0 and r["elapsed_s"] > 0
        assert r["breakdown_min"]["forward"] <= r["breakdown"]["forward"] <= r["breakdown_max"]["forward"]
    assert ddp_run[-1]["eta_s"] == 0


def test_the_summary_corrects_the_prediction_by_the_first_10_steps(ddp_out: Path) -> None:
    """Logged at step 1 and every 5 steps: fitted on the intervals of steps 2-5 and 6-10 (each
    term their median), judged on the steps after."""
    summary = json.loads((ddp_out / "summary.json").read_text())
    recs = records(ddp_out)
    fitted = [r["breakdown"] for r in recs if 1 < r["step"] <= 10]
    assert len(fitted) == 2
    measured = {t: statistics.median(b[t] for b in fitted) for t in fitted[0]}
    assert summary["corrected_step_time_s"] == pytest.approx(sum(measured.values()))
    predicted = recs[0]["predicted"]
    assert summary["correction_factors"]["compute"] == pytest.approx(
        (measured["forward"] + measured["backward"]) / (predicted["compute"] + predicted["tp_comm"]))
    after = statistics.median([r["step_time_s"] for r in recs if r["step"] > 10 for _ in range(5)])
    assert summary["corrected_error"] == pytest.approx(after / summary["corrected_step_time_s"] - 1)


def test_a_slowed_tensor_parallel_collective_shows_in_tp_comm_only(tmp_path: Path) -> None:
    """Rank 1 sleeps 30 ms as it launches each step's first tensor-parallel collective from step
    16 on: its own ``tp_comm`` grows by the delay, and so does rank 0's, which waits for rank 1's
    share in the same collective; the other terms stay put. The waits also take up the ranks'
    skew, which moves by a few ms between phases on this machine (in 6 runs the term grew by
    31-40 ms), so the growth is held to between nine tenths of the delay and half as much again."""
    out = train(tmp_path / "run", *LOGGED, "--steps", str(2 * PHASE), "--nproc", "2", "--plan", "tp=2",
                "--metrics.tp_comm", "true",
                env={"ZHILU_FAULTS": f"delay:rank=1:term=tp_comm:ms={DELAY_MS}:step={PHASE + 1}"})
    recs = records(out)
    delay = DELAY_MS / 1e3
    for rank in (None, 0, 1):
        before, after = phase(recs, 0, rank), phase(recs, 1, rank)
        assert 0.9 * delay <= after["tp_comm"] - before["tp_comm"] <= 1.5 * delay, (rank, before, after)
        for other in before.keys() - {"tp_comm"}:
            change = after[other] - before[other]
            assert abs(change) <= max(0.1 * before[other], 0.005), (rank, other, change, before, after)
    assert_terms_sum_to_step_time(recs)


def test_a_slower_pipeline_stage_shows_in_its_forward_and_in_the_other_stages_wait(tmp_path: Path) -> None:
    """Stage 1 computes 10 ms longer before each of its 4 micro-batches' forward from step 16:
    its ``forward`` grows by the 4 delays. Under 1F1B on two stages each of those forwards lies
    between stage 0's send of its activations and stage 0's receipt of its gradient, so stage 0,
    whose own work is unchanged, waits as much longer (its ``pipeline`` term: the schedule's time
    outside its own chunks). Stage 1's own wait changes by what the step grew beyond the delays.
    No other term of either stage moves."""
    mb, ms = 4, 10
    out = train(tmp_path / "run", *LOGGED, "--steps", str(2 * PHASE), "--nproc", "2", "--plan", f"pp=2,mb={mb}",
                env={"ZHILU_FAULTS": f"delay:rank=1:term=pipeline:ms={ms}:step={PHASE + 1}"})
    recs = records(out)
    delay = mb * ms / 1e3
    (before0, after0), (before1, after1) = [(phase(recs, 0, rank), phase(recs, 1, rank)) for rank in (0, 1)]
    grown = sum(after0.values()) - sum(before0.values())
    assert grown > delay / 2, (before0, after0)  # the slowed stage now bounds the step
    assert_only_grows(before0, after0, "pipeline", delay)
    assert_only_grows({k: v for k, v in before1.items() if k != "pipeline"},
                      {k: v for k, v in after1.items() if k != "pipeline"}, "forward", delay)
    shrunk = before1["pipeline"] - after1["pipeline"]
    assert abs(shrunk - (delay - grown)) <= max(0.1 * delay, 0.005), (before1, after1, grown)
    assert_terms_sum_to_step_time(recs)


# Four times the injection runs' batch (about 9 ms of compute per rank and step), so that the
# machine's own bursts (a few ms within an interval: page faults, interrupts charged to the
# thread) stay below the threshold.
STRAGGLER_RUN = [*LOGGED[:-2], "--global-batch", "32", "--steps", "20", "--nproc", "2"]


@pytest.mark.parametrize("plan", ["dp=2", "dp=2,zero=3"])
def test_a_rank_slowed_by_30_percent_is_named_within_20_steps(tmp_path: Path, plan: str) -> None:
    out = train(tmp_path / "run", *STRAGGLER_RUN, "--plan", plan, env={"ZHILU_FAULTS": "slow:rank=1:percent=30"})
    recs = records(out)
    assert recs[-1]["straggler"] == 1, [r["compute_s_by_rank"] for r in recs]
    # past the start-up steps, which are not judged (rank 0's own start-up work can outweigh 30%)
    judged = [r for r in recs if r["step"] > STRAGGLER_STEPS]
    assert judged and all(r["slowest_rank"] == 1 for r in judged), [r["compute_s_by_rank"] for r in recs]


@pytest.mark.parametrize("plan", ["dp=2", "dp=2,zero=3"])
def test_the_same_run_without_the_slow_rank_names_no_straggler(tmp_path: Path, plan: str) -> None:
    recs = records(train(tmp_path / "run", *STRAGGLER_RUN, "--plan", plan))
    assert all(r["straggler"] is None for r in recs), [r["compute_s_by_rank"] for r in recs]


def test_mfu_is_the_flops_a_flop_counter_counts_over_the_peak(ddp_out: Path, ddp_run: list[dict]) -> None:
    """MFU from the model's FLOPs formula against FlopCounterMode's count of a real forward and
    backward of the same model on a batch of the same shape. Attention runs on PyTorch's math
    backend, whose products the counter sees (it has no formula for the CPU's fused kernel)."""
    cfg = JobConfig()
    for key, value in zip(MICRO[::2], MICRO[1::2]):
        if key.startswith("--model."):
            cfg.override(key[2:], value)
    spec = spec_of(cfg)
    model = spec.build()
    tokens = torch.zeros(1, 32, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        spec.loss(model(tokens), tokens).backward()
    flops_per_token = counter.get_total_flops() / tokens.numel()
    peak = json.loads((ddp_out / "summary.json").read_text())["peak_tflops"]
    for r in ddp_run:
        assert 0 < r["mfu"] <= 1
        assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_s"] / (2 * peak * 1e12), rel=0.05)


@pytest.fixture(scope="module")
def recompute_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two DDP ranks that recompute every block in full."""
    return records(train(tmp_path_factory.mktemp("recompute") / "run", "--train.log_every", "4", "--steps", "12",
                         "--nproc", "2", "--plan", "dp=2,recompute=full"))


def test_recomputation_is_its_own_term(recompute_run: list[dict], ddp_run: list[dict]) -> None:
    """The blocks' second forward, inside the backward, is timed apart from it; without
    recomputation there is no such term."""
    assert all("recompute" not in r["breakdown"] for r in ddp_run)
    for r in recompute_run:
        split = r["breakdown"]
        assert 0 < split["recompute"] < 1.5 * split["forward"] and split["backward"] > 0, split
    assert_terms_sum_to_step_time(recompute_run)


def test_hfu_counts_the_forward_that_full_recomputation_runs_again(recompute_run: list[dict],
                                                                   ddp_run: list[dict]) -> None:
    """HFU over MFU is the FLOPs of a real step whose blocks are checkpointed (torch.utils.checkpoint,
    so the forward runs again in the backward) over those of the same step without; equal without
    recomputation."""
    for r in ddp_run:
        assert r["hfu"] == r["mfu"]
    cfg = JobConfig()
    for key, value in zip(MICRO[::2], MICRO[1::2]):
        if key.startswith("--model."):
            cfg.override(key[2:], value)
    spec = spec_of(cfg)
    tokens = torch.zeros(1, 32, dtype=torch.long)

    def step_flops(checkpointed: bool) -> int:
        model = spec.build()
        blocks = spec.blocks_of(model)
        if checkpointed:
            for block in blocks.values() if isinstance(blocks, torch.nn.ModuleDict) else blocks:
                block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            spec.loss(model(tokens), tokens).backward()
        return counter.get_total_flops()

    ratio = step_flops(True) / step_flops(False)
    assert ratio > 1.2  # each block's forward is most of the model's forward
    for r in recompute_run:
        assert 0 < r["mfu"] < r["hfu"] <= 1
        assert r["hfu"] == pytest.approx(r["mfu"] * ratio, rel=0.01)
