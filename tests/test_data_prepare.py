"""`zhilu data prepare` and `inspect`: cleaning, deduplication, tokenizers, shards, workers, resume, bad data."""

from __future__ import annotations

import hashlib
import json
import os
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import zhilu
from zhilu.data import manifest as mf
from zhilu.data.prepare import PrepareOptions, prepare
from zhilu.data.prepare.clean import CleanSettings
from zhilu.data.prepare.dedup import DedupSettings, shingles
from zhilu.data.prepare.pipeline import STOP_AFTER
from zhilu.data.tokenizer import ByteTokenizer, FileTokenizer, TokenizerChoice, train_bpe

WORDS = [f"w{i}" + "".join(random.Random(i).choice("abcdefghij") for _ in range(4)) for i in range(5000)]


def document(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edited(text: str, n_words: int, seed: int) -> str:
    """``text`` with ``n_words`` words, evenly spread, replaced by others."""
    words = text.split()
    for k, i in enumerate(range(len(words) // (2 * n_words), len(words), len(words) // n_words)):
        words[i] = f"changed{seed}x{k}"
    return " ".join(words)


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a, 5), shingles(b, 5)
    return len(sa & sb) / len(sa | sb)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def quiet(srcs: list[str], out: Path, workers: int = 1, **options: object) -> dict:
    return prepare(srcs, out, PrepareOptions(**options), workers, say=lambda line: None)  # type: ignore[arg-type]


def documents(out: Path) -> list[str]:
    """Every document of a prepared dataset, decoded, training then validation, without its end-of-text id."""
    manifest, _ = mf.read(out)
    assert manifest["tokenizer"]["kind"] == "bytes"
    texts = []
    for s in manifest["shards"]:
        tokens = np.fromfile(out / s["tokens"], dtype=manifest["dtype"])
        offsets = np.fromfile(out / s["docs"], dtype="<u8")
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert tokens[b - 1] == ByteTokenizer.eos_id
            texts.append(bytes(tokens[a:b - 1].astype(np.uint8)).decode())
    return texts


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_exact_and_near_duplicates_are_removed_and_unique_documents_kept(tmp_path: Path) -> None:
    unique = [document(seed) for seed in range(30)]
    near = [edited(unique[i], 3, seed=i) for i in range(0, 10)]  # 3 of 200 words changed
    distant = [edited(unique[i], 40, seed=i) for i in range(10, 15)]  # 40 changed: another document
    exact = [unique[i] for i in range(20, 25)]
    assert all(jaccard(unique[i], near[i]) >= 0.8 for i in range(10))
    assert all(jaccard(unique[10 + i], distant[i]) < 0.5 for i in range(5))
    copies = near + distant + exact
    random.Random(0).shuffle(copies)
    corpus = unique + copies  # of each group, the original is read first and kept

    out = tmp_path / "ds"
    manifest = quiet([str(write_jsonl(tmp_path / "c.jsonl", corpus))], out, val_fraction=0)
    assert documents(out) == unique + [t for t in copies if t in distant]
    counts = manifest["counts"]
    assert counts["dropped"] == {"exact_duplicate": 5, "near_duplicate": 10}
    assert counts["documents_in"] == len(corpus) and counts["documents_kept"] == 35


def test_near_threshold_one_removes_exact_duplicates_only(tmp_path: Path) -> None:
    a = document(1)
    manifest = quiet([str(write_jsonl(tmp_path / "c.jsonl", [a, edited(a, 1, 0), a]))], tmp_path / "ds",
                     dedup=DedupSettings(near_threshold=1.0))
    assert manifest["counts"]["dropped"] == {"exact_duplicate": 1}


def test_cleaning_normalises_and_filters_and_counts_each_reason(tmp_path: Path) -> None:
    texts = ["Cafe\u0301 au lait\x07 is served\x00 here, every day of the week.",  # NFC, control chars out
             "tiny", "1234567890 " * 10, "long " * 100, "A fine document of ordinary words."]
    manifest = quiet([str(write_jsonl(tmp_path / "c.jsonl", texts))], tmp_path / "ds", val_fraction=0,
                     clean=CleanSettings(min_chars=16, max_chars=200, min_alpha=0.25))
    assert documents(tmp_path / "ds") == ["Caf\u00e9 au lait is served here, every day of the week.",
                                          "A fine document of ordinary words."]
    assert unicodedata.is_normalized("NFC", documents(tmp_path / "ds")[0])
    assert manifest["counts"]["dropped"] == {"too_short": 1, "low_alpha": 1, "too_long": 1}


def test_shards_split_documents_into_training_and_validation_by_content_hash(tmp_path: Path) -> None:
    texts = [document(seed, 50) for seed in range(40)]
    manifest = quiet([str(write_jsonl(tmp_path / "c.jsonl", texts))], tmp_path / "ds", val_fraction=0.1,
                     shard_bytes=2000)
    splits = manifest["counts"]["splits"]
    assert splits["val"]["n_documents"] == 4 and splits["train"]["n_documents"] == 36
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 3
    by_hash = sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())
    got = documents(tmp_path / "ds")
    assert got[:36] == [t for t in texts if t not in by_hash[:4]]  # training keeps the order read
    assert sorted(got[36:]) == sorted(by_hash[:4])
    mf.check_shards(tmp_path / "ds", manifest, hashes=True)


def corpus_folder(root: Path) -> Path:
    """Text files, a JSON Lines file and duplicates, in subfolders."""
    for i in range(12):
        (root / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"part{i % 3}" / f"doc{i}.txt").write_text(document(100 + i, 120) + "\nÜnïcödé ✓\n")
    (root / "part0" / "copy.txt").write_text(document(100, 120) + "\nÜnïcödé ✓\n")
    write_jsonl(root / "lines.jsonl", [document(200 + i, 80) for i in range(30)] + [document(201, 80)])
    return root


def test_output_is_byte_identical_with_one_and_two_workers(tmp_path: Path) -> None:
    src = str(corpus_folder(tmp_path / "src"))
    for workers in (1, 2):
        quiet([src], tmp_path / f"w{workers}", workers=workers, tokenizer=TokenizerChoice.parse("bpe:300"),
              shard_bytes=3000)
    one, two = tree(tmp_path / "w1"), tree(tmp_path / "w2")
    assert len([name for name in one if name.endswith(".tokens")]) > 3
    assert one == two


def test_an_interrupted_prepare_resumes_to_the_same_output(tmp_path: Path) -> None:
    src = str(corpus_folder(tmp_path / "src"))
    args = ["data", "prepare", src, "--tokenizer", "bpe:300", "--shard-mb", "0.003", "--workers", "1"]
    whole = zhilu(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = zhilu(*args, "--out", str(tmp_path / "resumed"), env={STOP_AFTER: "2"})
    assert killed.returncode == -9
    assert not (tmp_path / "resumed" / mf.NAME).exists()
    assert len(list((tmp_path / "resumed" / ".prepare" / "shards").glob("*.json"))) == 2
    resumed = zhilu(*args, "--out", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of" in resumed.stderr and "already written" in resumed.stderr
    assert tree(tmp_path / "resumed") == tree(tmp_path / "whole")


def test_a_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    src = str(corpus_folder(tmp_path / "src"))
    out = str(tmp_path / "ds")
    killed = zhilu("data", "prepare", src, "--out", out, "--shard-mb", "0.003", "--workers", "1", env={STOP_AFTER: "1"})
    assert killed.returncode == -9
    other = zhilu("data", "prepare", src, "--out", out, "--shard-mb", "0.003", "--min-chars", "40")
    assert other.returncode == 2 and other.stderr.startswith("error: --out: ") and "options" in other.stderr


def test_bpe_round_trips_any_text_exactly(tmp_path: Path) -> None:
    tok = train_bpe([document(seed, 100) for seed in range(50)] + ["def f(x):\n\treturn x  # ok\r\n"] * 20, 400,
                    tmp_path / "tokenizer.json")
    assert tok.vocab_size == 400 and tok.eos_id == 0
    for text in ["", "def f(x):\n\treturn x  # ok\r\n", "Ünïcödé ✓ 日本語 🙂\u200b \x00\x1b[0m",
                 "  leading and trailing spaces  ", document(999, 300), "\n\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    again = FileTokenizer(tmp_path / "tokenizer.json", 0)
    assert again.encode(document(5)) == tok.encode(document(5))


def test_bpe_dataset_decodes_to_the_cleaned_documents(tmp_path: Path) -> None:
    texts = [document(seed, 60) + " — ünïcode ✓" for seed in range(20)]
    quiet([str(write_jsonl(tmp_path / "c.jsonl", texts))], tmp_path / "ds", tokenizer=TokenizerChoice.parse("bpe:320"),
          val_fraction=0)
    manifest, _ = mf.read(tmp_path / "ds")
    tok = FileTokenizer(tmp_path / "ds" / "tokenizer.json", manifest["tokenizer"]["eos_id"])
    shard = manifest["shards"][0]
    tokens = np.fromfile(tmp_path / "ds" / shard["tokens"], dtype=manifest["dtype"])
    offsets = np.fromfile(tmp_path / "ds" / shard["docs"], dtype="<u8")
    decoded = [tok.decode(tokens[a:b - 1].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert decoded == texts and all(tokens[b - 1] == 0 for b in offsets[1:])


def test_parquet_gives_the_documents_of_the_same_json_lines(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [document(seed, 40) for seed in range(25)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet", row_group_size=7)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    quiet([str(tmp_path / "c.parquet")], tmp_path / "p", text_field="body")
    quiet([str(path)], tmp_path / "j", text_field="body")
    assert documents(tmp_path / "p") == documents(tmp_path / "j")


def test_inspect_summarises_the_manifest(tmp_path: Path) -> None:
    a = document(1)
    quiet([str(write_jsonl(tmp_path / "c.jsonl", [a, a, edited(a, 2, 0), document(2), document(3)]))], tmp_path / "ds")
    result = zhilu("data", "inspect", str(tmp_path / "ds"), "--json", "--verify")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert (s["documents_in"], s["documents_kept"], s["exact_duplicates"], s["near_duplicates"]) == (5, 3, 1, 1)
    assert s["tokens"] == sum(len(t.encode()) + 1 for t in (a, document(2), document(3)))
    text = zhilu("data", "inspect", str(tmp_path / "ds")).stdout
    assert "5 read (" in text and ", 3 kept" in text and "1 exact_duplicate" in text and "1 near_duplicate" in text


@pytest.mark.parametrize("case", ["empty file", "empty folder", "invalid utf-8", "json without the field",
                                  "not json", "unreadable"])
def test_bad_sources_are_one_line_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    good = document(1)
    src = tmp_path / "src"
    src.mkdir()
    where = ""
    if case == "empty file":
        (src / "a.txt").write_text("")
        target, where = src / "a.txt", "a.txt"
    elif case == "empty folder":
        target, where = src, "src"
    elif case == "invalid utf-8":
        (src / "a.txt").write_bytes(good.encode() + b"\xff\xfe bad")
        target, where = src, "a.txt (byte"
    elif case == "json without the field":
        write_jsonl(src / "a.jsonl", [good])
        (src / "a.jsonl").write_text((src / "a.jsonl").read_text() + '{"body": "x"}\n')
        target, where = src / "a.jsonl", "a.jsonl:2"
    elif case == "not json":
        (src / "a.jsonl").write_text(json.dumps({"text": good}) + "\n\n{oops\n")
        target, where = src / "a.jsonl", "a.jsonl:3"
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads a file of mode 000; the unreadable case needs another user")
        (src / "a.txt").write_text(good)
        (src / "a.txt").chmod(0)
        target, where = src / "a.txt", "a.txt"
    out = tmp_path / "out"
    result = zhilu("data", "prepare", str(target), "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], result.stderr
    assert not out.exists()  # nothing left behind


def test_skip_bad_drops_and_counts_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    good = [document(i, 30) for i in range(3)]
    path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in good)
                     + b'{"text": "\xff"}\n{"other": 1}\n[1, 2]\nnot json\n')
    manifest = quiet([str(path)], tmp_path / "ds", skip_bad=True)
    assert manifest["counts"]["dropped"] == {"invalid_utf8": 1, "missing_field": 2, "not_json": 1}
    assert manifest["counts"]["documents_in"] == 7 and manifest["counts"]["documents_kept"] == 3


@pytest.mark.parametrize("case", ["dataset", "other files", "a file"])
def test_an_out_that_holds_something_else_is_refused(tmp_path: Path, case: str) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [document(1)])
    out = tmp_path / "out"
    if case == "dataset":
        quiet([str(src)], out)
    elif case == "other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    before = tree(out) if out.is_dir() else out.read_bytes()
    result = zhilu("data", "prepare", str(src), "--out", str(out))
    assert result.returncode == 2 and result.stderr.startswith("error: --out: "), result.stderr
    assert (tree(out) if out.is_dir() else out.read_bytes()) == before
