"""The ten largest published runs (by GPU count): the search's own choice beside the published plan.

    python benchmarks/largest_runs.py [--published DIR] [--count 10]

For each run that ``benchmarks/published.py`` models, in decreasing GPU count: the published
plan as the model predicts it, and the plan ``zhilu plan`` would pick for the same model, GPUs,
global batch and software stack (the fastest that fits). Where the pick is predicted more than
10% faster, each term of the breakdown that moved is printed beside the plan settings the two
differ in, which is what the published run did not do. The model decides both sides, so a gain
here is the model's claim, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from published import DEFAULT_DIR, Row, bloom_rows, foundry_rows, nemo_rows, step_rows  # noqa: E402
from zhilu.perf.search import search  # noqa: E402
from zhilu.perf.step import Estimate  # noqa: E402

SETTINGS = ("dp", "tp", "pp", "zero", "sp", "mb", "schedule", "vstages", "recompute")
GAIN = 0.10  # a pick predicted more than this much faster is explained term by term


def modelled(root: Path) -> list[Row]:
    """Every step-time row of ``benchmarks/published.py``."""
    return step_rows(root) + foundry_rows(root) + bloom_rows(root)[0] + nemo_rows(root)


def largest(rows: list[Row], count: int) -> list[Row]:
    """The ``count`` modelled rows with the most GPUs (ties in the order the sources list them)."""
    modelled = [r for r in rows if r.case is not None]
    return sorted(modelled, key=lambda r: -r.case.cluster.devices)[:count]


def differences(published: Estimate, chosen: Estimate) -> str:
    a, b = published.plan, chosen.plan
    moved = [f"{k} {getattr(a, k)} -> {getattr(b, k)}" for k in SETTINGS if getattr(a, k) != getattr(b, k)]
    if published.micro_batch != chosen.micro_batch:
        moved.append(f"micro-batch {published.micro_batch} -> {chosen.micro_batch} sequences")
    return ", ".join(moved) or "the same plan"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", type=Path, default=DEFAULT_DIR, help="folder of the published CSV files")
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args(argv)
    for row in largest(modelled(args.published), args.count):
        case = row.case
        assert case is not None
        chosen = search(case.model, case.cluster, case.global_batch, fixed={"precision": "bf16"},
                        software=case.software, top=1)[0]
        pub = case.estimate
        gain = pub.step_time_s / chosen.step_time_s - 1
        print(f"{row.source}: {row.label} ({case.cluster.devices} GPUs, {case.software.name}); "
              f"published {row.published:.2f} s/step")
        print(f"  published plan {pub.plan_spec()}: predicted {pub.step_time_s:.2f} s"
              f"{'' if pub.fits else ' (predicted not to fit)'}")
        print(f"  search's pick  {chosen.plan_spec()}: predicted {chosen.step_time_s:.2f} s, "
              f"{abs(gain):.1%} {'faster' if gain >= 0 else 'slower'} than the published plan"
              f"{'' if pub.fits else ', which the search does not offer as it is predicted not to fit'}")
        if gain > GAIN:
            print(f"    differs in: {differences(pub, chosen)}")
            for term in pub.breakdown:
                delta = chosen.breakdown[term] - pub.breakdown[term]
                if abs(delta) >= 0.01 * pub.step_time_s:
                    before, after = pub.breakdown[term], chosen.breakdown[term]
                    print(f"    {term:<16} {before:7.2f} -> {after:7.2f} s ({delta:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
