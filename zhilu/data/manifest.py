"""A prepared dataset's ``manifest.json``, written last by ``zhilu data prepare``, and its checks.

    DIR/manifest.json            format, sources, settings, counts (documents and bytes kept and dropped,
                                 by reason; tokens per split and per document),
                                 tokenizer (kind, vocab_size, eos_id, file, sha256), dtype, shards
    DIR/tokenizer.json           the tokenizer (not for bytes)
    DIR/{split}-NNNNN.tokens     token ids, little-endian uint16 (vocabulary up to 65536) or uint32
    DIR/{split}-NNNNN.docs       uint64 offsets of the documents in the shard's tokens (n_documents + 1)

``split`` is ``train`` or ``val``. Each shard entry has ``tokens``, ``docs`` (file names),
``n_tokens``, ``n_documents``, ``bytes`` (UTF-8 bytes of its cleaned text) and the SHA-256 of
both files. A document's tokens end with the tokenizer's end-of-text id (where it has one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from zhilu.durable import sha256, write_atomic
from zhilu.errors import ZhiluError

FORMAT = "zhilu-dataset/1"
NAME = "manifest.json"
FIELD = "data.path"


def is_prepared(path: str | Path) -> bool:
    return bool(path) and (Path(path).expanduser() / NAME).is_file()


def vocab_size(path: str) -> int:
    """The vocabulary of the prepared dataset at ``path``; 0 when ``path`` is not one."""
    if not is_prepared(path):
        return 0
    manifest, _ = read(Path(path).expanduser())
    return int(manifest["tokenizer"]["vocab_size"])


def write(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (temporary file, fsync, rename)."""
    write_atomic(directory / NAME, json.dumps(manifest, indent=1))


def read(directory: Path, field: str = FIELD) -> tuple[dict[str, Any], str]:
    """The manifest and its SHA-256 (which names the dataset); ``field`` is named in errors."""
    path = directory / NAME
    valid = "valid: a directory `zhilu data prepare` wrote"
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise ZhiluError(field, f"{directory} holds no {NAME}; {valid}") from None
    except OSError as e:
        raise ZhiluError(field, f"cannot read {path} ({e.strerror})") from None
    except ValueError as e:
        raise ZhiluError(field, f"{path} is not JSON ({e}); {valid}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZhiluError(field, f"{path} is not a manifest of format {FORMAT}; {valid}")
    for key in ("tokenizer", "shards", "dtype", "counts"):
        if key not in manifest:
            raise ZhiluError(field, f"{path} has no {key!r}; prepare the data again")
    return manifest, hashlib.sha256(raw).hexdigest()


def check_shards(directory: Path, manifest: dict[str, Any], hashes: bool, field: str = FIELD) -> None:
    """Every file the manifest lists is there with its size and, with ``hashes``, its SHA-256."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    files = [(s["tokens"], s["n_tokens"] * itemsize, s["sha256"]) for s in manifest["shards"]]
    files += [(s["docs"], (s["n_documents"] + 1) * 8, s["docs_sha256"]) for s in manifest["shards"]]
    tok = manifest["tokenizer"]
    if tok.get("file"):
        files.append((tok["file"], None, tok["sha256"]))
    for name, size, digest in files:
        path = directory / name
        if not path.is_file():
            raise ZhiluError(field, f"{path} is missing; the dataset is damaged: prepare it again")
        if size is not None and path.stat().st_size != size:
            raise ZhiluError(field, f"{path} has {path.stat().st_size} bytes, the manifest says {size}; the dataset "
                                    "is damaged: prepare it again")
        if hashes and sha256(path) != digest:
            raise ZhiluError(field, f"{path} does not match its SHA-256 in the manifest; the dataset is damaged: "
                                    "prepare it again")
