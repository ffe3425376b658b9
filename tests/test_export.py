"""``zhilu export``: safetensors that load back bitwise, without the training stack (or with transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import train, zhilu
from test_hf import save_tiny

from zhilu.errors import ZhiluError
from zhilu.serve.export import export, load_export
from zhilu.serve.loading import load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("export") / "run", "--steps", "4")


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_an_export_loads_back_bitwise(run: Path, tmp_path: Path) -> None:
    result = zhilu("export", str(run), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("exported step 4 of ")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "zhilu-export/1" and config["step"] == 4 and config["tokenizer"]["kind"] == "bytes"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert_same_model(load_export(tmp_path / "out"), load_run(run).model)


def test_a_large_export_is_sharded_with_an_index(run: Path, tmp_path: Path) -> None:
    summary = export(run, tmp_path / "out", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(shards) <= set(summary["files"])
    model = load_run(run).model
    assert set(index["weight_map"]) == {n for n, _ in model.named_parameters()}
    assert_same_model(load_export(tmp_path / "out"), model)


def test_an_hf_run_exports_to_what_transformers_loads(tmp_path: Path) -> None:
    directory = save_tiny(tmp_path / "llama")
    out = tmp_path / "run"
    result = zhilu("train", "--model", f"hf:{directory}", "--steps", "3", "--seq-len", "32",
                   "--train.sample_tokens", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    export(out, tmp_path / "exported")
    served = load_run(out).model
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    theirs = loaded.state_dict()
    for name, tensor in served.state_dict().items():
        key = name if name.startswith("lm_head.") else f"model.{name}"
        assert torch.equal(theirs[key], tensor), name
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, served(tokens), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "exported" / "zhilu_export.json").read_text())["step"] == 3


def test_bad_input_is_refused_and_leaves_nothing(run: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(ZhiluError) as e:
        export(run, tmp_path / "full")
    assert e.value.field == "--out" and (tmp_path / "full" / "x").read_text() == "mine"
    with pytest.raises(ZhiluError) as e:
        export(tmp_path, tmp_path / "new")
    assert e.value.field == "RUN_DIR" and not (tmp_path / "new").exists()
    empty = train(tmp_path / "empty-run", "--steps", "1")
    for path in (empty / "checkpoints").iterdir():
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
    (empty / "checkpoints" / "latest").unlink()
    result = zhilu("export", str(empty), "--out", str(tmp_path / "new"))
    assert result.returncode == 2 and result.stderr.startswith("error: RUN_DIR") and "no good checkpoint" in result.stderr
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
    with pytest.raises(ZhiluError) as e:
        load_export(tmp_path)
    assert e.value.field == "DIR"
