"""What ``zhilu data prepare`` reads, as an ordered list of units of work, and the records of each.

A source is a text file (one document), a JSON Lines file (``.jsonl``, ``.ndjson``: one
document per line, in a field named by ``--text-field``), a Parquet file (``.parquet``: a
column of that name; needs pyarrow), a folder (its files, recursively, in sorted order of
their relative paths; hidden names skipped), or ``stdlib`` (the Python standard library's
``.py`` files, the corpus ``zhilu train`` reads by default). Large JSON Lines files are cut
into units of about 8 MiB at line ends and Parquet files into row groups, so the units, and
everything computed from them, are the same for any number of workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zhilu.data.corpus import STDLIB_NAME, stdlib_files
from zhilu.errors import ZhiluError

FIELD = "SRC"
VALID = "a text file, a .jsonl or .parquet file, a folder of them, or stdlib"
UNIT_BYTES = 8 << 20
JSONL = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Unit:
    """A piece of one file: ``[start, end)`` bytes of a JSON Lines file, row groups of a Parquet
    file, or a whole text file."""

    kind: str  # text | jsonl | parquet
    path: str
    name: str  # shown in messages: the path as given, or relative to the folder given
    start: int
    end: int
    in_folder: bool = False  # a folder's file that is not text (a NUL byte) is dropped, not an error


@dataclass(frozen=True)
class Record:
    """One document as read: its text, or why it cannot be read (``reason``), and where it is."""

    text: str | None
    reason: str | None
    where: str
    n_bytes: int  # as stored in the source


def units(sources: list[str]) -> list[Unit]:
    """The units of ``sources``, in order; a source that is missing, unreadable or empty is an error."""
    out: list[Unit] = []
    for src in sources:
        found = _source_units(src)
        if not found:
            raise ZhiluError(FIELD, f"{src} holds no files to read; valid: {VALID}")
        out += found
    return out


def _source_units(src: str) -> list[Unit]:
    if src == "stdlib":
        return [Unit("text", str(p), f"{STDLIB_NAME}/{rel}", 0, _size(p)) for rel, p in stdlib_files().items()]
    path = Path(src).expanduser()
    if not path.exists():
        raise ZhiluError(FIELD, f"{src} does not exist; valid: {VALID}")
    if path.is_dir():
        found: list[Unit] = []
        for rel, file in _walk(path):
            found += _file_units(file, f"{src.rstrip('/')}/{rel}", in_folder=True)
        return found
    if not path.is_file():
        raise ZhiluError(FIELD, f"{src} is not a regular file or a folder (a FIFO, socket or device); valid: {VALID}")
    if _size(path) == 0:
        raise ZhiluError(FIELD, f"{src} is empty; valid: {VALID}")
    return _file_units(path, src, in_folder=False)


def _walk(root: Path) -> list[tuple[str, Path]]:
    files: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            full = Path(folder, name)
            if not name.startswith(".") and full.is_file():
                files[full.relative_to(root).as_posix()] = full
    return sorted(files.items())


def _file_units(path: Path, name: str, in_folder: bool) -> list[Unit]:
    size = _size(path)
    if path.suffix == ".parquet":
        groups = _parquet_file(path, name).metadata.num_row_groups
        return [Unit("parquet", str(path), name, g, g + 1, in_folder) for g in range(groups)]
    if path.suffix in JSONL:
        return [Unit("jsonl", str(path), name, a, b, in_folder) for a, b in _line_ranges(path, size)]
    return [Unit("text", str(path), name, 0, size, in_folder)]


def _line_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about UNIT_BYTES that begin at the start of a line."""
    cuts = [0]
    with _open(path, path.name) as f:
        while cuts[-1] + UNIT_BYTES < size:
            f.seek(cuts[-1] + UNIT_BYTES)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [size]))


def read(unit: Unit, text_field: str) -> Iterator[Record]:
    """The records of ``unit``, in order."""
    if unit.kind == "text":
        data = _read_bytes(unit)
        if unit.in_folder and b"\0" in data:
            yield Record(None, "binary", unit.name, len(data))
            return
        yield _decoded(data, unit.name)
    elif unit.kind == "jsonl":
        yield from _jsonl(unit, text_field)
    else:
        yield from _parquet(unit, text_field)


def _decoded(data: bytes, where: str) -> Record:
    try:
        return Record(data.decode("utf-8"), None, where, len(data))
    except UnicodeDecodeError as e:
        return Record(None, "invalid_utf8", f"{where} (byte {e.start})", len(data))


def _jsonl(unit: Unit, text_field: str) -> Iterator[Record]:
    with _open(Path(unit.path), unit.name) as f:
        f.seek(unit.start)
        line_no = _line_number(unit) if unit.start else 1
        while f.tell() < unit.end:
            line = f.readline()
            where = f"{unit.name}:{line_no}"
            line_no += 1
            if not line.strip():
                continue
            decoded = _decoded(line, where)
            if decoded.text is None:
                yield decoded
                continue
            try:
                value = json.loads(decoded.text)
            except ValueError:
                yield Record(None, "not_json", where, len(line))
                continue
            text = value.get(text_field) if isinstance(value, dict) else None
            if not isinstance(text, str):
                yield Record(None, "missing_field", where, len(line))
                continue
            yield Record(text, None, where, len(line))


def _line_number(unit: Unit) -> int:
    """The number of the line at ``unit.start`` (1-based), for messages."""
    count = 1
    with _open(Path(unit.path), unit.name) as f:
        remaining = unit.start
        while remaining:
            block = f.read(min(remaining, 1 << 20))
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _parquet(unit: Unit, text_field: str) -> Iterator[Record]:
    table = _parquet_file(Path(unit.path), unit.name).read_row_group(unit.start)
    if text_field not in table.column_names:
        raise ZhiluError("--text-field", f"{unit.name} has no column {text_field!r}; valid: one of "
                                         f"{', '.join(table.column_names)}")
    first = sum(_parquet_file(Path(unit.path), unit.name).metadata.row_group(g).num_rows for g in range(unit.start))
    for i, text in enumerate(table.column(text_field).to_pylist()):
        where = f"{unit.name}:row {first + i}"
        if isinstance(text, bytes):
            yield _decoded(text, where)
        elif isinstance(text, str):
            yield Record(text, None, where, len(text.encode("utf-8", errors="surrogatepass")))
        else:
            yield Record(None, "missing_field", where, 0)


def _parquet_file(path: Path, name: str):  # type: ignore[no-untyped-def]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ZhiluError(FIELD, f"{name} is Parquet, which needs pyarrow: pip install 'zhilu[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error for a file that is not Parquet
        raise ZhiluError(FIELD, f"{name} is not a Parquet file pyarrow reads ({e})") from None


def _read_bytes(unit: Unit) -> bytes:
    with _open(Path(unit.path), unit.name) as f:
        return f.read()


def _open(path: Path, name: str):  # type: ignore[no-untyped-def]
    try:
        return open(path, "rb")
    except OSError as e:
        raise ZhiluError(FIELD, f"cannot read {name} ({e.strerror}); valid: {VALID} that can be read") from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise ZhiluError(FIELD, f"cannot read {path} ({e.strerror})") from None
