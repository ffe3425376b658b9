"""``zhilu data prepare``: read, clean, deduplicate, tokenize and shard a corpus; the manifest last.

    zhilu data prepare stdlib --out data/stdlib-bpe --tokenizer bpe:4096
    zhilu data prepare corpus.jsonl more/ --out data/web --workers 8 --near-threshold 0.8

Four steps: (1) workers read and clean the units of the sources and sign each document
(SHA-256 of its cleaned text, MinHash); one process then decides, in document order, which
documents are duplicates and which go to validation (the ``val_fraction`` with the smallest
SHA-256, so the split does not depend on order); this plan is saved. (2) A BPE tokenizer is
trained on the training documents (``bpe:VOCAB``). (3) Workers tokenize and write the shards,
each atomically, each marked done when written. (4) The manifest is written and the work
folder removed. Every decision is a function of the documents in order, so the output is
byte-identical for any ``--workers``; an interrupted prepare, run again with the same
command, keeps the plan, the tokenizer and the shards already done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import zhilu
from zhilu.data import manifest as mf
from zhilu.data import tokenizer as tk
from zhilu.data.prepare import shards, sources
from zhilu.data.prepare.clean import CleanSettings, clean
from zhilu.data.prepare.dedup import Deduplicator, DedupSettings, Signer
from zhilu.data.prepare.workers import Pool, bar
from zhilu.durable import sha256, write_atomic
from zhilu.errors import ZhiluError

WORK = ".prepare"
PIECE_BYTES = 4 << 20  # of text, tokenized by one worker at a time
STOP_AFTER = "ZHILU_PREPARE_STOP_AFTER"  # fault injection for the tests: SIGKILL after N shards are written
_LOCKS: list[int] = []  # the output folders' locks, held until this process ends
BAD_RECORDS = {"invalid_utf8": "not valid UTF-8", "not_json": "not a JSON object",
               "missing_field": "has no text field"}


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: tk.TokenizerChoice = field(default_factory=lambda: tk.TokenizerChoice.parse("bytes"))
    clean: CleanSettings = field(default_factory=CleanSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    text_field: str = "text"
    skip_bad: bool = False  # drop (and count) unreadable records instead of stopping at the first
    val_fraction: float = 0.05
    shard_bytes: int = 256 << 20  # of cleaned text per shard

    def validate(self) -> None:
        self.clean.validate()
        self.dedup.validate()
        if not 0 <= self.val_fraction < 1:
            raise ZhiluError("--val-fraction", f"must be at least 0 and below 1, got {self.val_fraction}")
        if self.shard_bytes < 1:
            raise ZhiluError("--shard-mb", "must be above 0")

    def as_dict(self) -> dict[str, Any]:
        return {"tokenizer": str(self.tokenizer), "clean": self.clean.as_dict(), "dedup": self.dedup.as_dict(),
                "text_field": self.text_field, "skip_bad": self.skip_bad, "val_fraction": self.val_fraction,
                "shard_bytes": self.shard_bytes}


def prepare(srcs: list[str], out: str | Path, options: PrepareOptions, workers: int = 1,
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prepare ``srcs`` into ``out`` and return the manifest (see :mod:`zhilu.data.manifest`)."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    options.validate()
    if workers < 1:
        raise ZhiluError("--workers", f"must be at least 1, got {workers}")
    out = Path(out).expanduser()
    units = sources.units(srcs)
    job = {"sources": srcs, "files": _fingerprints(units), "options": options.as_dict(), "zhilu": zhilu.__version__}
    created = not out.exists()
    work = _claim(out, job)
    try:
        manifest = _run(out, work, units, srcs, options, workers, say)
    except ZhiluError:  # the input is wrong: it would be again; leave nothing behind
        shutil.rmtree(out if created else work, ignore_errors=True)
        raise
    shutil.rmtree(work)
    return manifest


def _run(out: Path, work: Path, units: list[sources.Unit], srcs: list[str], options: PrepareOptions, workers: int,
         say: Callable[[str], None]) -> dict[str, Any]:
    with Pool(workers) as pool:
        plan = _load_json(work / "plan.json")
        if plan is None:
            plan = _scan(units, options, pool, say)
            _save_json(work / "plan.json", plan)
        else:
            say(f"zhilu data: resuming: {plan['counts']['documents_kept']:,} documents already planned")
        tokenizer, tok_entry = _tokenizer(out, units, plan, options, say)
        dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
        entries = _shards(out, work, units, plan, options, tokenizer, dtype, pool, say)
    manifest = _manifest(out, srcs, units, plan, options, tok_entry, dtype, entries)
    mf.write(out, manifest)
    return manifest


# -- (1) read, clean, sign; then decide in order -------------------------------------------
def _scan_unit(unit: sources.Unit, options: PrepareOptions) -> list[tuple[Any, ...]]:
    """(reason, sha256, signature, cleaned bytes, source bytes) of each record of ``unit``."""
    signer = Signer(options.dedup) if options.dedup.near else None
    out: list[tuple[Any, ...]] = []
    for record in sources.read(unit, options.text_field):
        if record.text is None:
            if record.reason in BAD_RECORDS and not options.skip_bad:
                raise ZhiluError(record.where, f"{BAD_RECORDS[record.reason]}; valid: UTF-8 text (JSON objects "
                                               f"with a {options.text_field!r} string in .jsonl), or --skip-bad to "
                                               "drop such records and count them")
            out.append((record.reason, None, None, 0, record.n_bytes))
            continue
        text, reason = clean(record.text, options.clean)
        data = text.encode("utf-8", errors="surrogatepass")
        if reason is not None:
            out.append((reason, None, None, 0, record.n_bytes))
            continue
        signature = signer(text) if signer is not None else None
        out.append((None, hashlib.sha256(data).digest(), signature, len(data), record.n_bytes))
    return out


def _scan(units: list[sources.Unit], options: PrepareOptions, pool: Pool, say: Callable[[str], None]) -> dict:
    dedup = Deduplicator(options.dedup)
    reasons: Counter[str] = Counter()
    dropped_bytes: Counter[str] = Counter()  # of source text, by reason (dropped documents are never tokenized)
    kept: list[tuple[int, int, bytes, int]] = []  # unit, record, sha256, bytes
    n_in = bytes_in = 0
    total = sum(u.end - u.start for u in units if u.kind != "parquet") or None
    with bar("reading", total, "B") as advance:
        for u, records in enumerate(pool.map(_scan_unit, units, options)):
            for r, (reason, digest, signature, n_bytes, src_bytes) in enumerate(records):
                n_in += 1
                bytes_in += src_bytes
                if reason is None:
                    reason = dedup.check(n_in, digest, signature)
                if reason is None:
                    kept.append((u, r, digest, n_bytes))
                else:
                    reasons[reason] += 1
                    dropped_bytes[reason] += src_bytes
            advance(units[u].end - units[u].start if units[u].kind != "parquet" else 0)
    if not kept:
        raise ZhiluError("SRC", f"no document of {n_in:,} was kept ({_reasons(reasons)}); valid: sources with text "
                                "that passes the filters (--min-chars, --min-alpha, ...)")
    n_val = 0 if options.val_fraction == 0 or len(kept) < 2 else max(1, round(options.val_fraction * len(kept)))
    val = set(sorted(range(len(kept)), key=lambda i: kept[i][2])[:n_val])
    plan: dict[str, Any] = {"counts": {"documents_in": n_in, "documents_kept": len(kept), "bytes_in": bytes_in,
                                       "bytes_kept": sum(k[3] for k in kept), "dropped": dict(sorted(reasons.items())),
                                       "bytes_dropped": dict(sorted(dropped_bytes.items()))},
                            "shards": []}
    for split in ("train", "val"):
        docs = [k for i, k in enumerate(kept) if (i in val) == (split == "val")]
        plan["shards"] += _plan_shards(split, docs, options.shard_bytes)
    say(f"zhilu data: {n_in:,} documents read, {len(kept):,} kept ({len(kept) - n_val:,} training, {n_val:,} "
        f"validation); dropped: {_reasons(reasons) or 'none'}")
    return plan


def _plan_shards(split: str, docs: list[tuple[int, int, bytes, int]], shard_bytes: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    refs: list[list[int]] = []
    size = 0
    for u, r, _, n_bytes in docs:
        refs.append([u, r, n_bytes])
        size += n_bytes
        if size >= shard_bytes:
            out.append({"name": f"{split}-{len(out):05d}", "split": split, "refs": refs, "bytes": size})
            refs, size = [], 0
    if refs:
        out.append({"name": f"{split}-{len(out):05d}", "split": split, "refs": refs, "bytes": size})
    return out


def _texts(units: Mapping[int, sources.Unit] | list[sources.Unit], refs: Iterable[list[int]],
           options: PrepareOptions) -> Iterator[str]:
    """The cleaned texts of the records ``refs`` ([unit, record, bytes], in order), reading each unit once in turn."""
    current, records = -1, []
    for u, r, _ in refs:
        if u != current:
            current, records = u, [rec.text for rec in sources.read(units[u], options.text_field)]
        text = records[r]
        assert text is not None
        yield clean(text, options.clean)[0]


# -- (2) the tokenizer ----------------------------------------------------------------------
def _tokenizer(out: Path, units: list[sources.Unit], plan: dict, options: PrepareOptions,
               say: Callable[[str], None]) -> tuple[tk.Tokenizer, dict[str, Any]]:
    choice = options.tokenizer
    if choice.kind == "bytes":
        tok: tk.Tokenizer = tk.ByteTokenizer()
        return tok, {"kind": "bytes", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    path = out / "tokenizer.json"
    if choice.kind == "hf":
        src = Path(choice.directory) / "tokenizer.json"
        shutil.copyfile(src, path.with_name("tokenizer.json.tmp"))
        path.with_name("tokenizer.json.tmp").replace(path)
        tok = tk.FileTokenizer(path, None)
        tok = tk.FileTokenizer(path, tk.hf_eos_id(Path(choice.directory), tok))
    elif path.is_file():
        tok = tk.FileTokenizer(path, 0)
        say(f"zhilu data: resuming: the BPE tokenizer ({tok.vocab_size:,} ids) is already trained")
    else:
        refs = (ref for s in plan["shards"] if s["split"] == "train" for ref in s["refs"])
        say(f"zhilu data: training a byte-level BPE of {choice.vocab_size:,} ids on the training documents")
        tok = tk.train_bpe(_texts(units, refs, options), choice.vocab_size, path)
    entry = {"kind": choice.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": path.name,
             "sha256": sha256(path)}
    if choice.kind == "hf":
        entry["source"] = choice.directory
    return tok, entry


# -- (3) shards -----------------------------------------------------------------------------
def _tokenize(refs: list[list[int]], units: dict[int, sources.Unit], options: PrepareOptions,
              tokenizer: tk.Tokenizer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return shards.tokenize(list(_texts(units, refs, options)), tokenizer, dtype)


def _pieces(shard: dict[str, Any]) -> list[list[list[int]]]:
    """The shard's documents in pieces of about PIECE_BYTES of text, which workers tokenize in turn."""
    pieces: list[list[list[int]]] = [[]]
    size = 0
    for ref in shard["refs"]:
        if size >= PIECE_BYTES:
            pieces.append([])
            size = 0
        pieces[-1].append(ref)
        size += ref[2]
    return pieces


def _shards(out: Path, work: Path, units: list[sources.Unit], plan: dict, options: PrepareOptions,
            tokenizer: tk.Tokenizer, dtype: str, pool: Pool, say: Callable[[str], None]) -> list[dict[str, Any]]:
    done = {s["name"]: e for s in plan["shards"] if (e := _done(out, work, s["name"])) is not None}
    todo = [s for s in plan["shards"] if s["name"] not in done]
    if done:
        say(f"zhilu data: resuming: {len(done)} of {len(plan['shards'])} shards already written")
    tasks = []  # (shard, piece, whether it is the shard's last)
    for shard in todo:
        pieces = _pieces(shard)
        tasks += [(shard, piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    results = pool.map_each(_tokenize, [(piece, {u: units[u] for u, _, _ in piece}) for _, piece, _ in tasks],
                            options, tokenizer, dtype)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    with bar("tokenizing", sum(s["bytes"] for s in todo), "B") as advance:
        for (shard, piece, last), part in zip(tasks, results):
            parts.append(part)
            advance(sum(ref[2] for ref in piece))
            if not last:
                continue
            tokens = np.concatenate([p[0] for p in parts])
            entry = {"split": shard["split"], **shards.write(out, shard["name"], tokens,
                                                             np.concatenate([p[1] for p in parts]), shard["bytes"])}
            parts = []
            _save_json(work / "shards" / f"{shard['name']}.json", entry)
            done[shard["name"]] = entry
            if len(done) == int(os.environ.get(STOP_AFTER, 0)):
                os.kill(os.getpid(), signal.SIGKILL)
    return [done[s["name"]] for s in plan["shards"]]


def _done(out: Path, work: Path, name: str) -> dict[str, Any] | None:
    """The entry of a shard an earlier run finished, if its files are still as written."""
    entry = _load_json(work / "shards" / f"{name}.json")
    if entry is None:
        return None
    for key, digest in (("tokens", "sha256"), ("docs", "docs_sha256")):
        path = out / entry[key]
        if not path.is_file() or sha256(path) != entry[digest]:
            return None
    return entry


# -- (4) the manifest ------------------------------------------------------------------------
def _manifest(out: Path, srcs: list[str], units: list[sources.Unit], plan: dict, options: PrepareOptions,
              tok_entry: dict[str, Any], dtype: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    lengths = np.concatenate([np.diff(np.fromfile(out / e["docs"], dtype="<u8")) for e in entries])
    splits = {split: {key: sum(e[key] for e in entries if e["split"] == split)
                      for key in ("n_documents", "n_tokens", "bytes")} for split in ("train", "val")}
    per_source = Counter(_source_of(u.name, srcs) for u in units)
    return {
        "format": mf.FORMAT,
        "created_by": f"zhilu {zhilu.__version__}",
        "sources": [{"source": s, "units": per_source[s]} for s in srcs],
        "settings": options.as_dict(),
        "counts": {**plan["counts"], "tokens": int(lengths.sum()), "splits": splits,
                   "document_tokens": {"min": int(lengths.min()), "p10": int(np.percentile(lengths, 10)),
                                       "median": int(np.median(lengths)), "p90": int(np.percentile(lengths, 90)),
                                       "max": int(lengths.max())}},
        "tokenizer": tok_entry,
        "dtype": dtype,
        "shards": entries,
    }


def _source_of(name: str, srcs: list[str]) -> str:
    return next((s for s in srcs if name == s or name.startswith(s.rstrip("/") + "/")), srcs[0])


# -- the output folder and its work folder ----------------------------------------------------
def _claim(out: Path, job: dict[str, Any]) -> Path:
    """Create ``out`` (or take up the interrupted prepare in it) and lock it; its work folder."""
    if out.exists() and not out.is_dir():
        raise ZhiluError("--out", f"{out} is a file; valid: a new or empty directory")
    if (out / mf.NAME).exists():
        raise ZhiluError("--out", f"{out} already holds a prepared dataset; valid: another --out (or delete it)")
    work = out / WORK
    if out.is_dir() and any(out.iterdir()) and not (work / "job.json").is_file():
        raise ZhiluError("--out", f"{out} is not empty and holds no interrupted prepare; valid: a new or empty "
                                  "directory")
    try:
        (work / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZhiluError("--out", f"cannot create {work} ({e.strerror}); valid: a directory that can be "
                                  "written") from None
    lock = os.open(work / "lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ZhiluError("--out", f"{out} is being prepared by another process; valid: another --out") from None
    _LOCKS.append(lock)
    earlier = _load_json(work / "job.json")
    if earlier is not None and earlier != job:
        changed = sorted(k for k in job if earlier.get(k) != job[k])
        raise ZhiluError("--out", f"{out} holds an interrupted prepare of other {' and '.join(changed)}; valid: the "
                                  "same command to resume it, or another --out")
    if earlier is None:
        _save_json(work / "job.json", job)
    return work


def _fingerprints(units: list[sources.Unit]) -> list[list[Any]]:
    seen: dict[str, list[Any]] = {}
    for u in units:
        if u.path not in seen:
            st = os.stat(u.path)
            seen[u.path] = [u.path, st.st_size, st.st_mtime_ns]
    return list(seen.values())


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value))


def _reasons(reasons: Counter[str]) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in reasons.most_common())
