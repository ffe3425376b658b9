"""The files a run writes as it goes: metrics.jsonl (one line per logged step) and summary.json.

Both are strict JSON: a NaN or infinite number is written as null.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsFile:
    """metrics.jsonl, one line per logged step. Continuing from step ``start_step`` (a resume, a
    restart, a rollback) drops the lines past it, so the file is the history of the run's state."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except ValueError:  # a line cut short by a crash
                    break
        self._file = None
        self.truncate(start_step)

    def truncate(self, step: int) -> None:
        """Keep the lines of steps up to ``step``; later writes follow them."""
        self.records = [r for r in self.records if isinstance(r, dict) and r.get("step", step + 1) <= step]
        if self._file is not None:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(_dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(_dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(finite(record), allow_nan=False)
