"""``zhilu data``: prepare a corpus for training, and say what a prepared dataset holds.

    zhilu data prepare stdlib --out data/stdlib-bpe --tokenizer bpe:4096
    zhilu data prepare notes/ dump.jsonl --out data/mine --workers 4 --skip-bad
    zhilu data inspect data/stdlib-bpe [--json] [--verify]
    zhilu train --data data/stdlib-bpe
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from zhilu.data import manifest as mf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{prepare,inspect}")
    p = sub.add_parser("prepare", help="clean, deduplicate, tokenize and shard SRC... into --out",
                       description="Clean, deduplicate, tokenize and shard text into a dataset `zhilu train --data` "
                       "streams; run again with the same arguments to resume an interrupted prepare.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="a text file, a .jsonl or .parquet file, a folder of "
                   "them, or stdlib (the Python standard library)")
    p.add_argument("--out", required=True, help="the dataset's directory (new or empty, or an interrupted prepare)")
    p.add_argument("--tokenizer", default="bytes", help="bytes (default), bpe:VOCAB (train a byte-level BPE of VOCAB "
                   "ids here) or hf:DIR (the tokenizer.json of a transformers model)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: the CPUs "
                   "this process may use); the output is the same for any number")
    p.add_argument("--text-field", default="text", help="the field holding the text in JSON Lines and Parquet "
                   "(default text)")
    p.add_argument("--skip-bad", action="store_true", help="drop records that are not UTF-8, not JSON or have no "
                   "text field, and count them, instead of stopping at the first")
    p.add_argument("--normalize", default="NFC", help="Unicode normal form: NFC (default), NFKC or none")
    p.add_argument("--min-chars", type=int, default=16, help="drop shorter documents (default 16)")
    p.add_argument("--max-chars", type=int, default=0, help="drop longer documents (default 0: no limit)")
    p.add_argument("--min-alpha", type=float, default=0.25, help="drop documents whose share of letters is lower "
                   "(default 0.25)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity of word 5-grams from which "
                   "a document is a near duplicate of an earlier one (default 0.8; 1: exact duplicates only)")
    p.add_argument("--num-perm", type=int, default=256, help="MinHash permutations (default 256)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the documents held out for "
                   "validation (default 0.05)")
    p.add_argument("--shard-mb", type=float, default=256, help="MB of text per shard (default 256)")
    i = sub.add_parser("inspect", help="what a prepared dataset holds",
                       description="Summarise a prepared dataset's manifest: documents, duplicates, drop reasons, "
                       "tokens, tokenizer and shards.")
    i.add_argument("directory", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true", help="also check every file's SHA-256")


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        return _prepare(args)
    return _inspect(args)


def _prepare(args: argparse.Namespace) -> int:
    from zhilu.data.prepare import PrepareOptions, prepare
    from zhilu.data.prepare.clean import CleanSettings
    from zhilu.data.prepare.dedup import DedupSettings
    from zhilu.data.tokenizer import TokenizerChoice

    options = PrepareOptions(
        tokenizer=TokenizerChoice.parse(args.tokenizer),
        clean=CleanSettings(args.normalize, args.min_chars, args.max_chars, args.min_alpha),
        dedup=DedupSettings(args.near_threshold, args.num_perm),
        text_field=args.text_field, skip_bad=args.skip_bad, val_fraction=args.val_fraction,
        shard_bytes=int(args.shard_mb * 1e6),
    )
    prepare(args.sources, args.out, options, args.workers)
    manifest, digest = mf.read(Path(args.out).expanduser())
    print(_text(summary(Path(args.out), manifest, digest)))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    directory = Path(args.directory).expanduser()
    manifest, digest = mf.read(directory, "DIR")
    mf.check_shards(directory, manifest, hashes=args.verify, field="DIR")
    s = summary(directory, manifest, digest)
    print(json.dumps(s, indent=1) if args.json else _text(s))
    return 0


def summary(directory: Path, manifest: dict[str, Any], digest: str) -> dict[str, Any]:
    """What ``inspect --json`` prints."""
    c = manifest["counts"]
    dropped = c["dropped"]
    return {
        "path": str(directory), "manifest_sha256": digest, "created_by": manifest.get("created_by"),
        "sources": manifest["sources"],
        "documents_in": c["documents_in"], "documents_kept": c["documents_kept"],
        "exact_duplicates": dropped.get("exact_duplicate", 0), "near_duplicates": dropped.get("near_duplicate", 0),
        "dropped": dropped, "bytes_dropped": c.get("bytes_dropped", {}), "bytes_in": c["bytes_in"],
        "bytes_kept": c["bytes_kept"],
        "tokens": c["tokens"], "splits": c["splits"], "document_tokens": c["document_tokens"],
        "tokenizer": {**manifest["tokenizer"], "name": manifest["settings"]["tokenizer"]},
        "dtype": manifest["dtype"], "shards": len(manifest["shards"]), "settings": manifest["settings"],
    }


def _text(s: dict[str, Any]) -> str:
    splits, lengths, tok = s["splits"], s["document_tokens"], s["tokenizer"]
    dropped = ", ".join(f"{n:,} {why} ({s['bytes_dropped'].get(why, 0) / 1e6:.2f} MB)"
                        for why, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1])) or "none"
    eos = "none" if tok.get("eos_id") is None else tok["eos_id"]
    return "\n".join([
        f"dataset {s['path']} (manifest {s['manifest_sha256'][:12]}, {s['created_by']})",
        "sources: " + ", ".join(f"{x['source']} ({x['units']} units)" for x in s["sources"]),
        f"documents: {s['documents_in']:,} read ({s['bytes_in'] / 1e6:.1f} MB), {s['documents_kept']:,} kept "
        f"({s['documents_kept'] / s['documents_in']:.1%}): {splits['train']['n_documents']:,} training, "
        f"{splits['val']['n_documents']:,} validation",
        f"dropped: {dropped}",
        f"tokens: {s['tokens']:,} ({splits['train']['n_tokens']:,} training, {splits['val']['n_tokens']:,} "
        f"validation), {s['bytes_kept'] / s['tokens']:.2f} bytes of text per token",
        "tokens per document: " + ", ".join(f"{k} {v:,}" for k, v in lengths.items()),
        f"tokenizer: {tok['name']} ({tok['vocab_size']:,} ids, end of text {eos})"
        + (f", sha256 {tok['sha256'][:12]}" if tok.get("sha256") else ""),
        f"shards: {s['shards']} of {s['dtype']}",
    ])
