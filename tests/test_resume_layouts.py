"""Resume on another layout: saved under one plan and world size, continued under another,
the run trains on the same global batches in the same order and its loss trajectory and
parameters continue the uninterrupted run's (within fp32 rounding of other reduction orders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_run, train, zhilu, MICRO
from zhilu.data.loader import ShardedLoader

STEPS = 8
JOB = ["--steps", str(STEPS), "--global-batch", "8", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("single") / "run", *JOB)


@pytest.mark.parametrize("before,after", [
    ((2, "dp=2"), (1, "")),
    ((2, "dp=2"), (2, "dp=2,zero=3")),
    ((2, "tp=2"), (2, "dp=2")),
    ((2, "pp=2,mb=2"), (2, "tp=2")),
    ((4, "dp=4"), (2, "dp=2")),
], ids=["dp2-dp1", "dp2-zero3", "tp2-dp2", "pp2-tp2", "4ranks-2ranks"])
def test_a_run_resumed_on_another_layout_continues_the_trajectory(before: tuple[int, str], after: tuple[int, str],
                                                                 single_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    crashed = zhilu("train", *MICRO, *JOB, "--out", str(out), "--nproc", str(before[0]), "--plan", before[1],
                    env={"ZHILU_FAULTS": "kill:rank=1:step=6"})
    assert crashed.returncode == 1, crashed.stderr[-3000:]  # out of restarts after step 5; checkpoint at 4
    train(out, *JOB, "--nproc", str(after[0]), "--plan", after[1], "--resume")
    assert_same_run(out, single_process, STEPS, n_layers=2)
    batches = [json.loads(line)["batch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert batches == list(range(STEPS))  # the same global batches, in the same order


@pytest.mark.parametrize("before,after", [(2, 1), (1, 4), (4, 2)])
def test_the_samples_consumed_across_a_layout_change_are_the_uninterrupted_runs(before: int, after: int) -> None:
    """Every rank's share of global batch k is a slice of the one-process batch k, and the
    loader's position is global: the windows consumed, counted with repetition, are the same."""
    tokens = np.arange(10_000) % 251
    seq_len, batch, saved_at, total = 16, 8, 3, 7

    def windows(dp: int, start: int, stop: int) -> list[tuple[int, ...]]:
        seen = []
        for rank in range(dp):
            loader = ShardedLoader(tokens, seq_len, batch, rank, dp, seed=5)
            loader.load_state_dict({"batches_drawn": start})
            for _ in range(start, stop):
                x, _ = loader.next_batch()
                seen += [tuple(row.tolist()) for row in x]
        return seen

    resumed = windows(before, 0, saved_at) + windows(after, saved_at, total)
    assert sorted(resumed) == sorted(windows(1, 0, total))
