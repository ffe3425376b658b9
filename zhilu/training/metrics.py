"""The files a run writes as it goes: metrics.jsonl (one line per logged step) and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsFile:
    """metrics.jsonl, one line per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, start_step: int) -> None:
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
