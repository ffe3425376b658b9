"""Loading a checkpoint never runs code from it, never loads damaged files, and follows
``checkpoints/latest`` only to a checkpoint of the same run.

The crafted ``.metadata`` below is a real DCP metadata pickle with one extra object whose
``__reduce__`` writes a marker file; its SHA-256 is updated in the manifest, as a tamperer
would. The first test shows the payload does run under DCP's own reader.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from conftest import MICRO, train, zhilu
from zhilu.errors import ZhiluError
from zhilu.models.gpt import build_model
from zhilu.models.presets import preset
from zhilu.training.checkpoint import CheckpointReader, Checkpointer, latest_checkpoint, load_model, verify

STEPS = ["--steps", "6", "--global-batch", "8"]


def _model(seed: int = 1) -> torch.nn.Module:
    return build_model(preset("gpt-tiny", n_layers=2, hidden=64, n_heads=4, ffn_hidden=128), seed=seed)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with one checkpoint (step 2) of a model after one optimizer step."""
    run = tmp_path_factory.mktemp("saved") / "run"
    model = _model()
    opt = _optimizer(model)
    model(torch.zeros(2, 8, dtype=torch.long)).float().sum().backward()
    opt.step()
    Checkpointer(run, keep=3).save(2, [model], [opt], {"step": 2, "loader": {}})
    return run


@pytest.fixture
def run(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``saved`` that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "run"))


class Payload:
    """Unpickling it calls ``callable_(*args)``: what a tampered ``.metadata`` can do to plain pickle."""

    def __init__(self, callable_: object, *args: object) -> None:
        self.call = (callable_, args)

    def __reduce__(self) -> tuple:
        return self.call


def _payloads(marker: Path) -> dict[str, Payload]:
    return {
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "builtins.getattr": Payload(getattr, marker, "touch"),  # a bound method; harmless, still refused
    }


def _rewrite_metadata(ckpt: Path, change) -> None:
    """Replace ``.metadata`` by ``change(metadata)`` pickled, and update its SHA-256 in the manifest."""
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # written by this test's own save: trusted
    data = pickle.dumps(change(metadata))
    (ckpt / ".metadata").write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][".metadata"] = hashlib.sha256(data).hexdigest()
    manifest["sizes"][".metadata"] = len(data)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _plant(ckpt: Path, payload: Payload) -> None:
    def change(metadata):
        metadata.version = payload  # DCP ignores the field: a plain load would go on normally
        return metadata
    _rewrite_metadata(ckpt, change)


def test_the_payload_runs_under_dcps_own_reader(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _plant(latest_checkpoint(run), _payloads(marker)["builtins.exec"])
    FileSystemReader(latest_checkpoint(run)).read_metadata()
    assert marker.exists()


@pytest.mark.parametrize("forbidden", ["builtins.exec", "os.system", "builtins.getattr"])
def test_every_load_refuses_a_crafted_metadata(forbidden: str, run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = latest_checkpoint(run)
    _plant(ckpt, _payloads(marker)[forbidden])
    module, name = forbidden.split(".")
    module = {"os": os.system.__module__}.get(module, module)  # posix.system
    model = _model(seed=2)
    loads = {
        "verify": lambda: verify(ckpt),
        "Checkpointer.load": lambda: Checkpointer(run, 3).load(ckpt, [model], [_optimizer(model)]),
        "load_model": lambda: load_model(ckpt, model),
    }
    for what, load in loads.items():
        with pytest.raises(ZhiluError) as e:
            load()
        assert e.value.field == "checkpoint.resume", what
        assert str(ckpt) in e.value.message and f"{module}.{name}" in e.value.message, what
        assert "refuses to load" in e.value.message, what
        assert not marker.exists(), what


def test_a_pickled_object_item_is_refused(run: Path) -> None:
    """DCP reads a bytes item with torch.load(weights_only=False): neither its metadata nor its read pass."""
    ckpt = latest_checkpoint(run)

    def change(metadata):
        metadata.state_dict_metadata["model.norm.weight"] = BytesStorageMetadata()
        return metadata
    _rewrite_metadata(ckpt, change)
    with pytest.raises(ZhiluError, match="BytesStorageMetadata"):
        verify(ckpt)
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("x"), dest_offsets=torch.Size([0]),
                    storage_index=MetadataIndex("x"), storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    with pytest.raises(ZhiluError, match="pickled object"):
        CheckpointReader(ckpt).read_data(LoadPlan([item]), None)


def test_metadata_may_name_only_the_checkpoints_own_files(run: Path) -> None:
    ckpt = latest_checkpoint(run)

    def change(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../../outside.distcp"
        return metadata
    _rewrite_metadata(ckpt, change)
    with pytest.raises(ZhiluError, match=r"names '\.\./\.\./outside\.distcp', not a file of this checkpoint"):
        load_model(ckpt, _model())


def test_an_intact_checkpoint_loads_in_process(run: Path) -> None:
    ckpt = latest_checkpoint(run)
    model = _model(seed=2)
    state = Checkpointer(run, 3).load(ckpt, [model], [_optimizer(model)])
    assert state["step"] == 2
    reference = _model(seed=3)
    load_model(ckpt, reference)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.state_dict().values(), _model(seed=2).state_dict().values()))


def test_every_load_refuses_a_damaged_file(run: Path) -> None:
    ckpt = latest_checkpoint(run)
    data = bytearray((ckpt / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "__0_0.distcp").write_bytes(bytes(data))
    model = _model()
    for load in (lambda: Checkpointer(run, 3).newest_good(print), lambda: load_model(ckpt, model)):
        with pytest.raises(ZhiluError, match=r"step-00000002 is damaged \(__0_0.distcp changed"):
            load()


def test_resume_of_a_crafted_checkpoint_exits_2_and_runs_nothing(tmp_path: Path) -> None:
    out = train(tmp_path / "run", "--steps", "2", "--global-batch", "8")
    marker = tmp_path / "pwned"
    _plant(latest_checkpoint(out), _payloads(marker)["os.system"])
    result = zhilu("train", *MICRO, "--steps", "4", "--global-batch", "8", "--out", str(out), "--resume")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint.resume" in errors[0] and "system" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def _outside(run: Path, tmp_path: Path) -> Path:
    """A complete checkpoint outside the run directory."""
    outside = tmp_path / "outside"
    shutil.copytree(latest_checkpoint(run), outside)
    return outside


@pytest.mark.parametrize("pointer", ["../../outside", "ABSOLUTE", "step-00000002/../../../outside", b"\x00\xff\xfe\n",
                                     "step-00000009", "LINK", "garbage"])
def test_latest_must_name_a_checkpoint_of_the_run(pointer: str | bytes, run: Path, tmp_path: Path) -> None:
    outside = _outside(run, tmp_path)
    root = run / "checkpoints"
    if pointer == "ABSOLUTE":
        pointer = str(outside)
    elif pointer == "LINK":
        (root / "step-00000009").symlink_to(outside, target_is_directory=True)
        pointer = "step-00000009"
    (root / "latest").write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode() + b"\n")
    assert latest_checkpoint(run) is None
    with pytest.raises(ZhiluError) as e:
        latest_checkpoint(run, strict=True)
    assert e.value.field == "checkpoint.resume"
    assert str(root / "latest") in e.value.message and "valid:" in e.value.message and "step-00000002" in e.value.message


def test_a_valid_latest_is_followed(run: Path) -> None:
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    assert latest_checkpoint(run, strict=True) == run / "checkpoints" / "step-00000002"
