"""System CPU of writing a checkpoint-sized file through the page cache and with ``O_DIRECT``, side by side.

    .venv/bin/python benchmarks/direct_io.py [--gib 1.5] [--repeats 2] [--dir DIR]

Writes ``--gib`` GiB of random bytes (8 MiB pieces, the same buffer each time) to a file in
``--dir`` (default: the system's temporary directory), in turns: buffered (``open``, write,
fsync, as a plain writer does) and with :class:`zhilu.training.direct_io.DirectWriter`;
``--repeats`` times each. Prints the system and user CPU seconds (``getrusage``) and the wall
time of each write, and the medians. The system CPU of a buffered write is the kernel's page
cache work (allocating, filling, writing back and reclaiming a page per 4 KiB), which a
background checkpoint takes from the training beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from zhilu.training.direct_io import DirectWriter

PIECE = 8 << 20


def write(path: Path, total: int, piece: bytes, direct: bool) -> tuple[float, float, float]:
    """(system CPU s, user CPU s, wall s) of writing ``total`` bytes to ``path`` and making them durable."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if direct:
        with DirectWriter(path) as f:
            for _ in range(total // PIECE):
                f.write(piece)
    else:
        with open(path, "wb") as f:
            for _ in range(total // PIECE):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
    after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - start
    path.unlink()
    return after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    total = int(args.gib * (1 << 30)) // PIECE * PIECE
    piece = os.urandom(PIECE)
    results: dict[str, list[tuple[float, float, float]]] = {"buffered": [], "O_DIRECT": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        with DirectWriter(Path(tmp) / "probe") as probe:
            direct_works = probe.direct
        for r in range(args.repeats):
            for kind in ("buffered", "O_DIRECT"):
                figures = write(Path(tmp) / "file", total, piece, kind == "O_DIRECT")
                results[kind].append(figures)
                print(f"{kind:>9} #{r + 1}: system {figures[0]:.2f} s, user {figures[1]:.2f} s, "
                      f"wall {figures[2]:.2f} s")
    print(f"{total / (1 << 30):.2f} GiB to {args.dir or tempfile.gettempdir()}"
          + ("" if direct_works else " (the file system refuses O_DIRECT: both buffered)"))
    for kind, rows in results.items():
        print(f"{kind:>9}: median system CPU {statistics.median(r[0] for r in rows):.2f} s, user "
              f"{statistics.median(r[1] for r in rows):.2f} s, wall {statistics.median(r[2] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
