"""Corpus sources and the sharded, resumable loader."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from zhilu.data.corpus import load_corpus
from zhilu.data.loader import ShardedLoader, eval_batches
from zhilu.errors import ZhiluError


def write_folder(root: Path, n_files: int = 40) -> dict[str, bytes]:
    files = {f"dir{i % 3}/file{i:02d}.txt": f"contents of file number {i}\n".encode() * 3 for i in range(n_files)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def in_val(rel: str, val_fraction: float) -> bool:
    return zlib.crc32(rel.encode()) % 100 < val_fraction * 100


# --- corpus -------------------------------------------------------------------------------


def test_default_corpus_is_the_standard_library_split_by_file() -> None:
    corpus = load_corpus(None)
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    assert "standard library" in corpus.source and "files" in corpus.source
    assert len(corpus.val) > 100_000 and len(corpus.train) > 10 * len(corpus.val)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    top_level = sorted(p.name for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    val_file = stdlib / next(name for name in top_level if in_val(name, 0.05))
    train_file = stdlib / next(name for name in top_level if not in_val(name, 0.05))
    val_bytes, train_bytes = corpus.val.tobytes(), corpus.train.tobytes()
    assert val_file.read_bytes() in val_bytes and val_file.read_bytes() not in train_bytes
    assert train_file.read_bytes() in train_bytes and train_file.read_bytes() not in val_bytes
    excluded = stdlib / "test" / "test_os.py"  # absent where a distribution packages the tests apart
    assert not excluded.exists() or excluded.read_bytes() not in train_bytes + val_bytes
    assert load_corpus("").source == corpus.source


def test_text_file_splits_by_position(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(200)) * 5)
    corpus = load_corpus(str(path), val_fraction=0.1)
    assert corpus.vocab_size == 256
    assert len(corpus.train) == 900 and len(corpus.val) == 100
    assert np.concatenate([corpus.train, corpus.val]).tobytes() == path.read_bytes()


def test_folder_splits_by_file_and_skips_hidden_and_binary_files(tmp_path: Path) -> None:
    files = write_folder(tmp_path)
    (tmp_path / ".hidden.txt").write_bytes(b"secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_bytes(b"git config")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0\0binary")
    corpus = load_corpus(str(tmp_path), val_fraction=0.2)
    expected_val = b"".join(data + b"\n" for rel, data in sorted(files.items()) if in_val(rel, 0.2))
    expected_train = b"".join(data + b"\n" for rel, data in sorted(files.items()) if not in_val(rel, 0.2))
    assert expected_val and expected_train
    assert corpus.val.tobytes() == expected_val and corpus.train.tobytes() == expected_train
    assert "40 files" in corpus.source


def test_folder_with_one_file_splits_by_position(tmp_path: Path) -> None:
    (tmp_path / "only.txt").write_bytes(b"x" * 99)
    corpus = load_corpus(str(tmp_path), val_fraction=0.1)
    assert len(corpus.train) == 90 and len(corpus.val) == 10  # 99 bytes + separator


def test_bin_file_is_uint16_tokens_split_by_position(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.uint16) % 700
    tokens.tofile(tmp_path / "tokens.bin")
    corpus = load_corpus(str(tmp_path / "tokens.bin"), val_fraction=0.1)
    assert corpus.train.dtype == np.uint16 and isinstance(corpus.train, np.memmap)
    assert corpus.vocab_size == 700
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
    assert len(corpus.val) == 100


def test_train_bin_takes_val_bin_beside_it(tmp_path: Path) -> None:
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([3, 1000, 4], dtype=np.uint16).tofile(tmp_path / "val.bin")
    for path in (tmp_path / "train.bin", tmp_path):
        corpus = load_corpus(str(path))
        assert len(corpus.train) == 500
        np.testing.assert_array_equal(corpus.val, [3, 1000, 4])
        assert corpus.vocab_size == 1001


@pytest.mark.parametrize(
    ("name", "content"),
    [("missing.txt", None), ("empty.txt", b""), ("", None), ("odd.bin", b"abc"), ("empty.bin", b"")],
    ids=["missing", "empty-file", "empty-folder", "odd-bin", "empty-bin"],
)
def test_bad_paths_are_user_errors_naming_the_path(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ZhiluError) as err:
        load_corpus(str(path))
    assert err.value.field == "data.path"
    assert str(path) in err.value.message and ".bin token file" in err.value.message


def test_val_fraction_must_be_below_one() -> None:
    with pytest.raises(ZhiluError) as err:
        load_corpus(None, val_fraction=1.0)
    assert err.value.field == "data.val_fraction"


# --- loader -------------------------------------------------------------------------------

TOKENS = (np.arange(5000) % 251).astype(np.uint8)


def test_batches_are_next_token_windows() -> None:
    x, y = ShardedLoader(TOKENS, seq_len=16, global_batch=8, dp_rank=0, dp_size=1, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 251)  # TOKENS counts up mod 251


def test_windows_reach_the_last_token() -> None:
    tokens = np.arange(6, dtype=np.uint16)
    loader = ShardedLoader(tokens, seq_len=4, global_batch=64, dp_rank=0, dp_size=1, seed=0)
    starts = {int(row[0]) for _ in range(4) for row in loader.next_batch()[0]}
    assert starts == {0, 1}


@pytest.mark.parametrize("dp_size", [2, 4])
def test_rank_batches_concatenate_to_the_single_process_batch(dp_size: int) -> None:
    single = ShardedLoader(TOKENS, 16, 8, 0, 1, seed=5)
    ranks = [ShardedLoader(TOKENS, 16, 8, r, dp_size, seed=5) for r in range(dp_size)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert all(px.shape == (8 // dp_size, 16) for px, _ in parts)
        assert torch.equal(torch.cat([px for px, _ in parts]), x)
        assert torch.equal(torch.cat([py for _, py in parts]), y)


def test_seed_changes_batches_and_batches_change_each_step() -> None:
    a, b = ShardedLoader(TOKENS, 16, 8, 0, 1, seed=0), ShardedLoader(TOKENS, 16, 8, 0, 1, seed=1)
    first = a.next_batch()[0]
    assert not torch.equal(first, b.next_batch()[0])
    assert not torch.equal(first, a.next_batch()[0])


def test_resume_continues_exactly_where_the_saved_loader_was() -> None:
    original = ShardedLoader(TOKENS, 16, 8, 1, 2, seed=3)
    for _ in range(5):
        original.next_batch()
    state = original.state_dict()
    assert state == {"batches_drawn": 5, "skip": []}
    resumed = ShardedLoader(TOKENS, 16, 8, 1, 2, seed=3)
    resumed.load_state_dict(state)
    for _ in range(3):
        for expected, got in zip(original.next_batch(), resumed.next_batch()):
            assert torch.equal(expected, got)


def test_memmapped_tokens_load(tmp_path: Path) -> None:
    (np.arange(3000, dtype=np.uint16) % 1000).tofile(tmp_path / "t.bin")
    corpus = load_corpus(str(tmp_path / "t.bin"))
    x, y = ShardedLoader(corpus.train, 32, 4, 0, 1, seed=0).next_batch()
    assert x.dtype == torch.int64 and torch.equal(y[:, -1], (x[:, -1] + 1) % 1000)


def test_loader_errors_name_the_field() -> None:
    with pytest.raises(ZhiluError) as err:
        ShardedLoader(TOKENS[:16], seq_len=16, global_batch=8, dp_rank=0, dp_size=1, seed=0)
    assert err.value.field == "train.seq_len" and "only 16" in err.value.message
    with pytest.raises(ZhiluError) as err:
        ShardedLoader(TOKENS, seq_len=16, global_batch=6, dp_rank=0, dp_size=4, seed=0)
    assert err.value.field == "train.global_batch" and "multiple of 4" in err.value.message


def test_eval_batches_are_fixed_and_sharded_like_training() -> None:
    first = eval_batches(TOKENS, 16, n_batches=3, batch_size=8, dp_rank=0, dp_size=1)
    again = eval_batches(TOKENS, 16, n_batches=3, batch_size=8, dp_rank=0, dp_size=1)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.int64
    halves = [eval_batches(TOKENS, 16, 3, 8, r, 2) for r in range(2)]
    for k, (x, y) in enumerate(first):
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), x)
        assert torch.equal(torch.cat([halves[0][k][1], halves[1][k][1]]), y)
    with pytest.raises(ZhiluError, match="validation data has only 10"):
        eval_batches(TOKENS[:10], 16, 1, 8, 0, 1)
