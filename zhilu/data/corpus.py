"""Token corpora: byte-level text (a file, a folder, the Python standard library) or uint16 ``.bin`` tokens.

Text is tokenised as raw bytes (vocabulary 256). A multi-file corpus is the files in sorted
order of their relative paths, each followed by one ``b"\\n"``. Files are split between
training and validation by a hash of their relative path, so the split is disjoint and the
same on every machine and every run.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zhilu.errors import ZhiluError
from zhilu.spec import Tokenizer

FIELD = "data.path"
VALID = "a text file, a folder of text files, or a uint16 .bin token file"
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """Training and validation tokens (1-D integer arrays) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str


def load_corpus(path: str | None, val_fraction: float = 0.05, tokenizer: Tokenizer | None = None) -> Corpus:
    """Load the corpus at ``path``; ``None`` or ``""`` means the Python standard library.

    Text is raw bytes, or, with a ``tokenizer`` (a model's own, e.g. from ``hf:DIR``), the
    tokenizer's ids of the training and the validation text (read as UTF-8). Token files are
    read as they are.

    - the standard library: its ``.py`` files, without site-packages/dist-packages and any
      folder named ``test``, ``tests`` or ``idle_test``; split by file.
    - a folder: its regular files (no FIFO, socket or device), recursively, skipping hidden
      names and files holding a NUL byte (not text); a folder holding ``train.bin`` is read as
      that token file. Split by file when files land on both sides, else by bytes like a single file.
    - anything else that is not a regular file (a FIFO, a device) is refused: it may never end.
    - a ``.bin`` file: nanoGPT-style uint16 tokens, memory-mapped; a ``train.bin`` with a
      ``val.bin`` beside it takes that as validation, anything else is split by position.
    - any other file: its bytes; the first ``1 - val_fraction`` train, the rest validate.

    A file belongs to validation when ``zlib.crc32(relative_posix_path) % 100 < val_fraction * 100``.
    """
    corpus = _load(path, val_fraction)
    if tokenizer is None or corpus.vocab_size > 256:
        return corpus
    train, val = (np.asarray(tokenizer.encode(bytes(part).decode("utf-8", errors="replace")), dtype=np.int64)
                  for part in (corpus.train, corpus.val))
    vocab = int(max(train.max(initial=0), val.max(initial=0))) + 1
    return Corpus(train, val, vocab, f"{corpus.source}, {len(train) + len(val):,} tokens of the model's tokenizer")


def _load(path: str | None, val_fraction: float) -> Corpus:
    if not 0 <= val_fraction < 1:
        raise ZhiluError("data.val_fraction", f"must be at least 0 and below 1, got {val_fraction}")
    if not path:
        return _stdlib_corpus(val_fraction)
    p = Path(path).expanduser()
    if not p.exists():
        raise ZhiluError(FIELD, f"{path} does not exist; give {VALID}")
    if p.is_dir():
        if (p / "train.bin").is_file():
            return _bin_corpus(p / "train.bin", val_fraction)
        return _folder_corpus(p, val_fraction)
    if not p.is_file():  # a FIFO or a device would be read forever
        raise ZhiluError(FIELD, f"{path} is not a regular file or a folder (a FIFO, socket or device); give {VALID}")
    if p.suffix == ".bin":
        return _bin_corpus(p, val_fraction)
    data = _read(p)
    if not data:
        raise ZhiluError(FIELD, f"{path} is empty; give {VALID}")
    train, val = _split_bytes(data, val_fraction)
    return Corpus(train, val, 256, f"text file {p} ({_mb(len(data))})")


STDLIB_NAME = f"python{sys.version_info.major}.{sys.version_info.minor} standard library"


def stdlib_files() -> dict[str, Path]:
    """The standard library's ``.py`` files by relative path, sorted, without site-packages,
    dist-packages and the folders named ``test``, ``tests`` or ``idle_test``."""
    root = sysconfig.get_paths()["stdlib"]
    files: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_STDLIB_DIRS]
        for name in names:
            if name.endswith(".py"):
                full = Path(folder, name)
                files[full.relative_to(root).as_posix()] = full
    return dict(sorted(files.items()))


def _stdlib_corpus(val_fraction: float) -> Corpus:
    contents = {rel: full.read_bytes() for rel, full in stdlib_files().items()}
    train, val = _split_files(contents, val_fraction)
    return Corpus(train, val, 256, f"{STDLIB_NAME} ({len(contents)} files, {_mb(len(train) + len(val))})")


def _folder_corpus(root: Path, val_fraction: float) -> Corpus:
    contents: dict[str, bytes] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            full = Path(folder, name)
            if name.startswith(".") or not full.is_file():  # regular files only: no FIFO, socket or device
                continue
            data = _read(full)
            if data and b"\0" not in data:
                contents[full.relative_to(root).as_posix()] = data
    if not contents:
        raise ZhiluError(FIELD, f"{root} holds no non-empty text files; give {VALID}")
    contents = dict(sorted(contents.items()))
    train, val = _split_files(contents, val_fraction)
    return Corpus(train, val, 256, f"folder {root} ({len(contents)} files, {_mb(len(train) + len(val))})")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ZhiluError(FIELD, f"cannot read {path} ({e.strerror}); give {VALID} that can be read") from None


def _bin_corpus(path: Path, val_fraction: float) -> Corpus:
    train = _memmap_tokens(path)
    val_path = path.with_name("val.bin")
    if path.name == "train.bin" and val_path.is_file():
        val = _memmap_tokens(val_path)
        source = f"token files {path} + {val_path.name} ({len(train):,} + {len(val):,} tokens)"
    else:
        cut = _cut(len(train), val_fraction)
        train, val = train[:cut], train[cut:]
        source = f"token file {path} ({len(train) + len(val):,} tokens)"
    vocab_size = int(max(train.max(), val.max() if len(val) else 0)) + 1
    return Corpus(train, val, vocab_size, source)


def _memmap_tokens(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise ZhiluError(FIELD, f"{path} is empty; give {VALID}")
    if size % 2:
        raise ZhiluError(FIELD, f"{path} has an odd size ({size} bytes), so it is not a uint16 token file; give {VALID}")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _split_files(contents: dict[str, bytes], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted files by path hash, or by position when one side would get no file."""
    threshold = val_fraction * 100
    in_val = {rel: zlib.crc32(rel.encode()) % 100 < threshold for rel in contents}
    if 0 < sum(in_val.values()) < len(contents):
        train = _join(data for rel, data in contents.items() if not in_val[rel])
        val = _join(data for rel, data in contents.items() if in_val[rel])
        return np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8)
    return _split_bytes(_join(contents.values()), val_fraction)


def _join(files: Iterable[bytes]) -> bytes:
    """The files' bytes, each followed by a newline, in one concatenation."""
    return b"".join(part for data in files for part in (data, b"\n"))


def _split_bytes(data: bytes, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.frombuffer(data, dtype=np.uint8)
    cut = _cut(len(tokens), val_fraction)
    return tokens[:cut], tokens[cut:]


def _cut(n: int, val_fraction: float) -> int:
    return n - int(n * val_fraction)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"
