"""Training on prepared data: streamed shards, document-aware epochs, checks before the start, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MICRO, train, zhilu
from test_data_prepare import corpus_folder, quiet
from zhilu.data import manifest as mf
from zhilu.data.prepared import DocumentLoader, open_dataset
from zhilu.data.tokenizer import TokenizerChoice

STEPS = 8
JOB = ["--steps", str(STEPS), "--global-batch", "8", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    out = root / "ds"
    quiet([str(corpus_folder(root / "src"))], out, tokenizer=TokenizerChoice.parse("bpe:400"), val_fraction=0.2,
          shard_bytes=5000)
    return out


def stream(split, order: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([split.shards[split.doc_shard[d]][split.doc_start[d]:][:split.doc_len[d]] for d in order])


def test_an_epoch_is_every_window_of_the_shuffled_documents_once(dataset: Path) -> None:
    """The contract of zhilu.data.prepared, computed here from its definition."""
    split = open_dataset(dataset, verify=True).split("train")
    assert len(split.shards) > 2
    seq_len, seed = 16, 3
    loader = DocumentLoader(split, seq_len, 4, 0, 1, seed=seed)
    assert loader.windows == (split.n_tokens - 1) // seq_len
    for epoch in (0, 1):
        order = np.random.default_rng([seed, epoch]).permutation(len(split.doc_len))
        windows = np.random.default_rng([seed, epoch, 1]).permutation(loader.windows)
        tokens = stream(split, order)
        assert len(tokens) == split.n_tokens
        for w in range(0, loader.windows, 5):
            start = windows[w] * seq_len
            assert np.array_equal(loader.window(epoch * loader.windows + w), tokens[start:start + seq_len + 1])


@pytest.mark.parametrize("dp_size", [2, 4])
def test_rank_batches_concatenate_to_the_single_process_batch(dataset: Path, dp_size: int) -> None:
    split = open_dataset(dataset, verify=False).split("train")
    single = DocumentLoader(split, 16, 8, 0, 1, seed=1)
    ranks = [DocumentLoader(split, 16, 8, r, dp_size, seed=1) for r in range(dp_size)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
        assert np.array_equal(x[:, 1:], y[:, :-1])


def test_a_resumed_loader_continues_exactly(dataset: Path) -> None:
    split = open_dataset(dataset, verify=False).split("train")
    loader = DocumentLoader(split, 16, 4, 0, 1, seed=2)
    for _ in range(5):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    later = [loader.next_batch()[0] for _ in range(3)]
    again = DocumentLoader(split, 16, 4, 0, 1, seed=2)
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(later, [again.next_batch()[0] for _ in range(3)]))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "manifest count"])
def test_a_damaged_dataset_is_refused_before_training_starts(dataset: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "ds"
    copy.mkdir()
    for p in dataset.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    manifest, _ = mf.read(copy)
    shard = copy / manifest["shards"][1]["tokens"]
    if damage == "flip a byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-2])
    else:
        manifest["shards"][1]["n_tokens"] += 1
        (copy / mf.NAME).write_text(json.dumps(manifest))
    out = tmp_path / "run"
    result = zhilu("train", *MICRO, "--steps", "2", "--data", str(copy), "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.path: {shard}"), result.stderr
    assert not (out / "metrics.jsonl").exists()


def test_a_preset_takes_the_datasets_vocabulary(dataset: Path, tmp_path: Path) -> None:
    out = train(tmp_path / "run", "--steps", "2", "--data", str(dataset))
    config = json.loads((out / "summary.json").read_text())
    assert config["final_val_loss"] is not None and config["final_val_loss_per_byte"] is not None
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["fingerprint"] == mf.read(dataset)[1]
    assert "prepared dataset" in recorded["description"] and "bpe:400" in recorded["description"]
    from zhilu.config import load_config
    from zhilu.models.registry import spec_of

    assert spec_of(load_config(str(out / "config.toml"))).vocab_size == 512  # 400 rounded up to a multiple of 128


def test_a_run_on_prepared_data_resumes_on_another_layout_at_the_exact_position(dataset: Path, tmp_path: Path) -> None:
    whole = train(tmp_path / "whole", *JOB, "--data", str(dataset))
    out = tmp_path / "run"
    crashed = zhilu("train", *MICRO, *JOB, "--data", str(dataset), "--out", str(out), "--nproc", "2",
                    "--plan", "dp=2", env={"ZHILU_FAULTS": "kill:rank=1:step=6"})
    assert crashed.returncode == 1, crashed.stderr[-3000:]  # checkpoint at step 4
    train(out, *JOB, "--data", str(dataset), "--nproc", "1", "--plan", "", "--resume")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == list(range(STEPS))
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference], rtol=1e-5)


def test_resuming_on_other_data_is_refused_unless_asked(dataset: Path, tmp_path: Path) -> None:
    out = train(tmp_path / "run", "--steps", "2", "--checkpoint-every", "2", "--data", str(dataset))
    refused = zhilu("train", *MICRO, "--steps", "4", "--out", str(out), "--resume", "--data", "")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.startswith("error: data.path: ") and "--data.allow_changed true" in refused.stderr
    assert json.loads((out / "data.json").read_text())["fingerprint"] == mf.read(dataset)[1]
    resumed = zhilu("train", *MICRO, "--steps", "4", "--out", str(out), "--resume", "--data", str(dataset))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_gpt_tiny_on_the_prepared_standard_library_with_bpe_beats_bytes_per_byte(tmp_path: Path) -> None:
    """The same model, steps and tokens per step: validation loss per byte falls, and below the byte-level run's."""
    data = tmp_path / "stdlib-bpe"
    prepared = zhilu("data", "prepare", "stdlib", "--out", str(data), "--tokenizer", "bpe:2048")
    assert prepared.returncode == 0, prepared.stderr
    job = ["--steps", "40", "--seq-len", "128", "--global-batch", "16", "--train.eval_every", "0",
           "--train.eval_batches", "4", "--train.sample_tokens", "32", "--train.log_every", "60"]
    runs = {}
    for name, data_args in (("bpe", ["--data", str(data)]), ("bytes", [])):
        result = zhilu("train", *job, *data_args, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    first, last = runs["bpe"][0]["val_loss_per_byte"], runs["bpe"][-1]["val_loss_per_byte"]
    assert last < first
    assert last < runs["bytes"][-1]["val_loss_per_byte"]
    sample = json.loads((tmp_path / "bpe" / "summary.json").read_text())["sample"]
    # decoded by the dataset's tokenizer (raw bytes would show each id past 255 as U+FFFD)
    assert len(sample) > 32 and sample.count("\ufffd") < len(sample) / 10


def test_an_hf_model_trains_on_data_of_its_own_tokenizer_only(dataset: Path, tmp_path: Path) -> None:
    from test_data_prepare import document, write_jsonl
    from test_hf import VOCAB, save_tiny
    from zhilu.data.tokenizer import train_bpe

    model = save_tiny(tmp_path / "model", weights=False)
    train_bpe([document(i, 80) for i in range(40)], 300, model / "tokenizer.json")
    src = str(write_jsonl(tmp_path / "c.jsonl", [document(100 + i, 120) for i in range(30)]))
    job = ["--model", f"hf:{model}", "--steps", "2", "--seq-len", "32", "--train.eval_batches", "2",
           "--train.sample_tokens", "8"]
    for name, tokenizer in (("own", f"hf:{model}"), ("bytes", "bytes")):
        result = zhilu("data", "prepare", src, "--out", str(tmp_path / name), "--tokenizer", tokenizer)
        assert result.returncode == 0, result.stderr
    own = mf.read(tmp_path / "own")[0]["tokenizer"]
    assert own["kind"] == "hf" and own["vocab_size"] == 300 and own["eos_id"] == 2  # LlamaConfig's eos_token_id
    trained = zhilu("train", *job, "--data", str(tmp_path / "own"), "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    for data, why in ((tmp_path / "bytes", "tokenizer"), (dataset, f"vocabulary of {VOCAB}")):
        refused = zhilu("train", *job, "--data", str(data), "--out", str(tmp_path / f"refused-{data.name}"))
        assert refused.returncode == 2 and refused.stderr.startswith("error: ") and why in refused.stderr, \
            refused.stderr[-2000:]
