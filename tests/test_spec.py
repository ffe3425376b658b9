"""The model interface, in process, with a small fake model: what a spec declares is applied,
what it does not declare is refused with an error naming the declaration."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zhilu.errors import ZhiluError
from zhilu.models.registry import resolve
from zhilu.parallel.mesh import ParallelEnv
from zhilu.parallel.parallelize import build_parallel, parallelize
from zhilu.parallel.pipeline_parallel import build_stage
from zhilu.plan import Plan
from zhilu.spec import ModelSpec, PipelineSplit, measure_flops, reset_parameters_by_name, resolve_patterns


class Fake(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed: nn.Module | None = nn.Embedding(32, 8)
        self.blocks = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
                                     for i in range(3)})
        self.head: nn.Module | None = nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        for block in self.blocks.values():
            h = h + block(h)
        return self.head(h) if self.head is not None else h


def fake_spec(**declared: object) -> ModelSpec:
    return ModelSpec(name="fake", build=Fake, vocab_size=32, max_seq_len=16, **declared)  # type: ignore[arg-type]


ALL = {"blocks": "blocks", "tp_plan": {"blocks.*.0": "colwise", "blocks.*.2": "rowwise"},
       "sp_plan": {"blocks.*": "sequence_parallel"}, "pipeline": PipelineSplit(first=("embed",), last=("head",))}
ONE_PROCESS = ParallelEnv(0, 1, 0, 1, torch.device("cpu"), None)


@pytest.mark.parametrize("plan, missing", [
    (Plan(tp=2), "tp_plan"), (Plan(tp=2, sp=True), "tp_plan"), (Plan(pp=2, mb=2), "pipeline"),
    (Plan(recompute="full"), "blocks"), (Plan(recompute="selective"), "blocks"),
])
def test_a_plan_needs_what_the_model_declares(plan: Plan, missing: str) -> None:
    with pytest.raises(ZhiluError, match=missing) as e:
        fake_spec().check_plan(plan)
    assert e.value.field == "parallel.plan" and "fake" in e.value.message
    fake_spec(**ALL).check_plan(plan)  # declared: accepted


def test_sequence_parallel_needs_its_own_declaration() -> None:
    spec = fake_spec(**{**ALL, "sp_plan": None})
    spec.check_plan(Plan(tp=2))
    with pytest.raises(ZhiluError, match="sp_plan"):
        spec.check_plan(Plan(tp=2, sp=True))


def test_more_pipeline_stages_than_blocks_are_refused() -> None:
    spec = fake_spec(**ALL)
    spec.check_plan(Plan(pp=3, mb=3))
    with pytest.raises(ZhiluError, match="3 blocks"):
        spec.check_plan(Plan(pp=2, mb=4, schedule="interleaved", vstages=2))


def test_a_spec_is_a_language_model_or_brings_its_data() -> None:
    with pytest.raises(ZhiluError, match="exactly one"):
        ModelSpec(name="x", build=Fake)
    with pytest.raises(ZhiluError, match="exactly one"):
        ModelSpec(name="x", build=Fake, vocab_size=32, dataset=lambda seed: ((None, None), (None, None)))
    with pytest.raises(ZhiluError, match="callables"):
        ModelSpec(name="x", build=None, vocab_size=32)  # type: ignore[arg-type]


def test_unknown_tensor_parallel_styles_are_refused() -> None:
    with pytest.raises(ZhiluError, match="'diagonal'.*colwise"):
        fake_spec(tp_plan={"head": "diagonal"})


def test_patterns_match_one_name_per_star() -> None:
    model = Fake()
    assert resolve_patterns(model, {"blocks.*.0": "colwise"}) == {f"blocks.{i}.0": "colwise" for i in range(3)}
    assert resolve_patterns(model, {"blocks.*": "x"}) == {f"blocks.{i}": "x" for i in range(3)}
    assert resolve_patterns(model, {"*.0": "x"}) == {"blocks.0": "x"}
    assert resolve_patterns(model, {"missing": "x"}) == {}


def test_default_init_is_seeded_by_name_so_a_stage_equals_the_whole_model() -> None:
    spec = fake_spec(**ALL)
    whole = spec.create(seed=3)
    assert not torch.equal(whole.blocks["0"][0].weight, spec.create(seed=4).blocks["0"][0].weight)
    stage = build_stage(spec, range(1, 3), first=False, last=True, device=torch.device("cpu"), seed=3)
    assert stage.embed is None and list(stage.blocks) == ["1", "2"]
    ref = dict(whole.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, ref[name]), name


def test_reset_by_name_is_independent_of_the_other_modules() -> None:
    a, b = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))
    reset_parameters_by_name(a, 0)
    reset_parameters_by_name(b, 0)
    assert torch.equal(a[0].weight, b[0].weight)


def test_one_process_plan_builds_the_whole_model() -> None:
    spec = fake_spec(**ALL)
    pm = build_parallel(spec, Plan(recompute="full"), ONE_PROCESS, seed=0)
    assert pm.pipeline is None and not pm.sharded_logits and len(pm.parts) == 1
    x = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(pm.parts[0](x), spec.create(seed=0)(x))
    with pytest.raises(ZhiluError, match="tp_plan"):
        parallelize(spec.create(), fake_spec(), Plan(tp=2), ONE_PROCESS)


def test_flops_are_counted_on_the_meta_device() -> None:
    spec = ModelSpec(name="mlp", build=lambda: nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 16)),
                     loss=F.mse_loss, dataset=lambda seed: ((torch.zeros(1, 64), torch.zeros(1, 16)),) * 2)
    # forward 2 * batch * in * out per product; backward the weight gradients (as much again) and
    # the input gradient of the second product (the first one's input needs none)
    counted = measure_flops(spec, torch.zeros(8, 64), torch.zeros(8, 16))
    assert counted == 4 * 8 * 64 * 32 + 6 * 8 * 32 * 16


def test_model_files_resolve_to_their_spec(tmp_path: Path) -> None:
    spec = resolve("examples/my_model.py:spec")
    assert spec.name == "mlp" and spec.source == "examples/my_model.py:spec" and spec.dataset is not None
    (tmp_path / "m.py").write_text("import zhilu, torch\n"
                                   "def make():\n"
                                   "    return zhilu.ModelSpec(name='made', build=lambda: torch.nn.Linear(2, 2),\n"
                                   "                           vocab_size=2)\n"
                                   "number = 3\n")
    assert resolve(f"{tmp_path}/m.py:make").name == "made"
    for name, message in [(f"{tmp_path}/m.py:other", "defines no 'other'"), (f"{tmp_path}/m.py:number", "is a int"),
                          (f"{tmp_path}/none.py:spec", "does not exist"), ("gpt-9", "unknown model")]:
        with pytest.raises(ZhiluError, match=message) as e:
            resolve(name)
        assert e.value.field == "model.name"
    with pytest.raises(ZhiluError, match="shape overrides"):
        resolve("examples/my_model.py:spec", {"n_layers": 2})


def test_a_spec_that_cannot_reach_other_processes_is_refused_before_they_start(tmp_path: Path) -> None:
    from zhilu.config import load_config
    from zhilu.launch.prepare import prepare

    cfg = load_config(None, [("launch.nproc", "2"), ("run.out", str(tmp_path / "run"))])
    local = ModelSpec(name="local", build=lambda: nn.Linear(2, 2), loss=F.mse_loss,
                      dataset=lambda seed: ((torch.zeros(64, 2), torch.zeros(64, 2)),) * 2)
    with pytest.raises(ZhiluError, match="cannot be sent to 2 processes.*module-level") as e:
        prepare(cfg, local, dry_run=True)
    assert e.value.field == "model.name"
    sendable = ModelSpec(name="sendable", build=partial(nn.Linear, 2, 2), loss=F.mse_loss, dataset=zeros)
    assert prepare(cfg, sendable, dry_run=True)[2] is sendable


def zeros(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return ((torch.zeros(64, 2), torch.zeros(64, 2)),) * 2
