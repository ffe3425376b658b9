"""The checkpoint writer in one process: what a checkpoint holds, what is kept, and that a
background save writes the state of the step it was asked for."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zhilu.models.gpt import build_model
from zhilu.models.presets import preset
from zhilu.training.checkpoint import Checkpointer, load_model, params_sha256
from zhilu.training.checkpoint_files import latest_checkpoint


def _model(seed: int = 0) -> torch.nn.Module:
    return build_model(preset("gpt-tiny", n_layers=1, hidden=32, n_heads=2, ffn_hidden=64), seed=seed)


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.zeros(2, 8, dtype=torch.long)).float().sum().backward()
    opt.step()
    return model, opt


def test_a_background_save_holds_the_state_it_was_given(tmp_path: Path) -> None:
    model, opt = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(tmp_path, keep=0, background=True)
    ckpt.save(1, [model], [opt], {"step": 1, "loader": {}})
    with torch.no_grad():  # training goes on while the write runs
        for p in model.parameters():
            p.add_(1.0)
    ckpt.wait()
    loaded = _model(seed=1)
    load_model(latest_checkpoint(tmp_path), loaded)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_manifest_records_sizes_checksums_and_versions(tmp_path: Path) -> None:
    model, opt = _trained()
    Checkpointer(tmp_path, keep=0, about={"versions": {"torch": torch.__version__}}).save(
        3, [model], [opt], {"step": 3, "loader": {"batches_drawn": 3}})
    path = latest_checkpoint(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["trainer"]["loader"] == {"batches_drawn": 3}
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["files"]) == set(manifest["sizes"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert all(manifest["sizes"][f] == (path / f).stat().st_size for f in manifest["files"])


def test_keep_counts_complete_checkpoints_only_and_never_drops_the_newest(tmp_path: Path) -> None:
    model, opt = _trained()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2):
        ckpt.save(step, [model], [opt], {"step": step, "loader": {}})
    incomplete = tmp_path / "checkpoints" / "step-00000009"
    incomplete.mkdir()  # no manifest: not a checkpoint, not counted, not deleted
    for step in (3, 4):
        ckpt.save(step, [model], [opt], {"step": step, "loader": {}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000003", "step-00000004", "step-00000009"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_the_parameter_hash_depends_on_the_values_alone(tmp_path: Path) -> None:
    model, opt = _trained()
    Checkpointer(tmp_path / "a", keep=0).save(1, [model], [opt], {"step": 1, "loader": {}})
    background = Checkpointer(tmp_path / "b", keep=0, background=True)
    background.save(7, [model], [opt], {"step": 7, "loader": {}})
    background.wait()
    a, b = (latest_checkpoint(tmp_path / x) for x in "ab")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    Checkpointer(tmp_path / "c", keep=0).save(1, [model], [opt], {"step": 1, "loader": {}})
    assert params_sha256(a) == params_sha256(a, budget_bytes=1)  # read all at once or a tensor at a time
    assert params_sha256(a) != params_sha256(latest_checkpoint(tmp_path / "c"))
    assert params_sha256(a) == params_sha256(b)  # another step, written in the background: same values


def test_the_rng_state_is_saved_and_restored(tmp_path: Path) -> None:
    model, opt = _trained()
    torch.manual_seed(1234)
    ckpt = Checkpointer(tmp_path, keep=0)
    ckpt.save(1, [model], [opt], {"step": 1, "loader": {}})
    expected = torch.rand(4)
    torch.manual_seed(0)
    ckpt.load(latest_checkpoint(tmp_path), [model], [opt])
    assert torch.equal(torch.rand(4), expected)


def test_background_checkpoint_threads_run_on_idle_cpu_time_and_training_keeps_its_priority() -> None:
    import os
    import threading

    import pytest

    from zhilu.training.checkpoint import _yield_cpu

    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("no SCHED_IDLE on this platform")
    seen: list[int] = []

    def background() -> None:
        _yield_cpu()
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    _yield_cpu()  # on the main thread: nothing changes
    assert seen == [os.SCHED_IDLE] and os.sched_getscheduler(0) == os.SCHED_OTHER
