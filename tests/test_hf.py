"""``--model hf:DIR``: transformers causal LMs from a local directory (zhilu.models.hf).

Every directory is built here with a tiny config and ``save_pretrained``; nothing is downloaded.
``tiny_llama_dir`` / ``tiny_llama_config_dir`` (and :func:`save_tiny`) are meant for reuse by
the ``zhilu train --model hf:DIR`` parity tests.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import transformers

from zhilu.errors import ZhiluError
from zhilu.models.hf import load, translate_tp_plan
from zhilu.parallel.pipeline_parallel import build_stage
from zhilu.plan import Plan

VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),  # shorter than the test sequences
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8,
                                                 "max_window_layers": 2}),  # full then sliding layers
}


def save_tiny(directory: Path, arch: str = "llama", weights: bool = True, seed: int = 0, **overrides: object) -> Path:
    """A tiny ``arch`` causal LM saved by ``save_pretrained``: weights and config, or the config alone."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra, **overrides})
    if weights:
        torch.manual_seed(seed)
        getattr(transformers, model_cls)(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama (hidden 64, 4 heads, 2 kv heads, vocabulary 320) with safetensors weights."""
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same Llama as config.json alone: zhilu initialises it from the seed."""
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny-llama-config", weights=False)


def reference(directory: Path) -> torch.nn.Module:
    """transformers' own model of ``directory``, fp32, sdpa attention."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation="sdpa").eval()


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def tokens(n: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True)])
def test_logits_and_gradients_equal_transformers(tmp_path: Path, arch: str, tied: bool) -> None:
    directory = save_tiny(tmp_path / arch, arch, tie_word_embeddings=tied)
    model, ref = load(str(directory)).create(), reference(directory)
    model.eval()
    x, y = tokens(), tokens(seed=2)
    logits, ref_logits = model(x), ref(x, use_cache=False).logits
    assert logits.shape == (2, 24, VOCAB)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref(x).logits, rtol=0, atol=0)  # with its default cache, too
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), y.flatten()).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[hf_name(name)].grad, rtol=0, atol=0, msg=name)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied


def test_checkpoint_init_equals_from_pretrained(tiny_llama_dir: Path) -> None:
    model, ref = load(str(tiny_llama_dir)).create(seed=7), reference(tiny_llama_dir)
    ref_state = ref.state_dict()
    state = model.state_dict()
    assert {hf_name(k) for k in state} == set(ref_state)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[hf_name(name)], rtol=0, atol=0, msg=name)
    assert load(str(tiny_llama_dir)).create(seed=8).state_dict().keys() == state.keys()
    torch.testing.assert_close(load(str(tiny_llama_dir)).create(seed=8).layers["0"].mlp.up_proj.weight,
                               model.layers["0"].mlp.up_proj.weight, rtol=0, atol=0)  # the seed is not used


def test_sharded_bf16_checkpoint(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**SMALL)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load(str(tmp_path)).create()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, hf.state_dict()[hf_name(name)].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("which", ["weights", "config"])
def test_pipeline_stages_hold_the_whole_models_tensors(tiny_llama_dir: Path, tiny_llama_config_dir: Path,
                                                       which: str) -> None:
    spec = load(str(tiny_llama_dir if which == "weights" else tiny_llama_config_dir))
    whole = spec.create(seed=5)
    whole_state = whole.state_dict()
    cpu = torch.device("cpu")
    first = build_stage(spec, range(0, 1), True, False, cpu, 5)
    middle = build_stage(spec, range(1, 3), False, False, cpu, 5)
    last = build_stage(spec, range(3, 4), False, True, cpu, 5)
    assert list(middle.layers.keys()) == ["1", "2"] and middle.embed_tokens is None and middle.lm_head is None
    names = [set(stage.state_dict()) for stage in (first, middle, last)]
    assert set.union(*names) == set(whole_state) and sum(map(len, names)) == len(whole_state)
    for stage in (first, middle, last):
        for name, tensor in stage.state_dict().items():
            torch.testing.assert_close(tensor, whole_state[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(stage.rotary_emb.inv_freq, whole.rotary_emb.inv_freq, rtol=0, atol=0)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(last(middle(first(x))), whole(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_wraps_the_decoder_layers(tiny_llama_dir: Path, mode: str) -> None:
    from zhilu.parallel.recompute import apply_recompute

    spec = load(str(tiny_llama_dir))
    model, plain = spec.create(), spec.create()
    apply_recompute(spec.blocks_of(model), mode)
    x, y = tokens(), tokens(seed=2)
    for m in (model, plain):
        spec.loss(m(x), y).backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name.replace("._checkpoint_wrapped_module", "")], rtol=0, atol=0)


def test_a_stage_reads_only_its_own_tensors(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.file = real(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.handle.get_tensor(name)

        def __getattr__(self, name: str) -> object:  # keys(), get_slice(): headers only
            if name == "handle":
                raise AttributeError(name)
            return getattr(self.handle, name)

    spec = load(str(tiny_llama_dir))
    monkeypatch.setattr(safetensors, "safe_open", Recording)
    build_stage(spec, range(2, 3), False, False, torch.device("cpu"), 0)
    assert read and all(name.startswith("model.layers.2.") for name in read)
    assert len(read) == 9  # 4 attention and 3 MLP projections, 2 norms


def test_seeded_init_is_deterministic_per_name_and_seed(tiny_llama_config_dir: Path) -> None:
    spec = load(str(tiny_llama_config_dir))
    a, b, c = spec.create(seed=1).state_dict(), spec.create(seed=1).state_dict(), spec.create(seed=2).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], c[q])
    assert not torch.equal(a[q], a["layers.1.self_attn.q_proj.weight"])
    assert torch.all(a["layers.0.input_layernorm.weight"] == 1) and torch.all(a["norm.weight"] == 1)
    assert abs(a["embed_tokens.weight"].std().item() - 0.02) < 0.002  # LlamaConfig.initializer_range
    assert abs(a["lm_head.weight"].std().item() - 0.02) < 0.002 and not torch.equal(a["lm_head.weight"],
                                                                                     a["embed_tokens.weight"])
    assert not any(t.is_meta or torch.isnan(t).any() for t in spec.create(seed=3).parameters())


def test_seeded_init_keeps_tied_embeddings_and_zeroes_padding(tmp_path: Path) -> None:
    spec = load(str(save_tiny(tmp_path / "tied", weights=False, tie_word_embeddings=True, pad_token_id=3,
                              attention_bias=True)))
    model = spec.create(seed=4)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.all(model.embed_tokens.weight[3] == 0) and model.embed_tokens.weight[4].abs().sum() > 0
    assert torch.all(model.layers["0"].self_attn.q_proj.bias == 0)


def test_tp_plan_translated_from_the_transformers_plan(tiny_llama_dir: Path, tmp_path: Path) -> None:
    projections = {
        "layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
    }
    assert dict(load(str(tiny_llama_dir)).tp_plan) == {"embed_tokens": "embedding", **projections,
                                                       "lm_head": "output_gather"}
    tied = load(str(save_tiny(tmp_path / "tied", weights=False, tie_word_embeddings=True)))
    assert dict(tied.tp_plan) == projections  # one tensor is not split two ways
    padded = load(str(save_tiny(tmp_path / "padded", weights=False, pad_token_id=0)))
    assert dict(padded.tp_plan) == {**projections, "lm_head": "output_gather"}
    assert dict(load(str(save_tiny(tmp_path / "qwen2", "qwen2", weights=False))).tp_plan) == dict(
        load(str(tiny_llama_dir)).tp_plan)
    assert translate_tp_plan({"model.norm": "sequence_parallel"}, "model", False, False, "hf:x") == {}


def test_spec_declarations(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = load(str(tiny_llama_dir))
    assert spec.name == "tiny-llama" and spec.source == f"hf:{tiny_llama_dir}"
    assert spec.vocab_size == VOCAB and spec.max_seq_len == 128 and spec.tokenizer is None
    assert spec.blocks == "layers" and spec.pipeline.first == ("embed_tokens",)
    assert spec.pipeline.last == ("norm", "lm_head") and spec.sp_plan is None
    shape = spec.shape
    assert (shape.n_layers, shape.hidden, shape.n_heads, shape.kv_heads, shape.ffn_hidden, shape.vocab_size,
            shape.max_seq_len, shape.tie_embeddings) == (4, 64, 4, 2, 128, VOCAB, 128, False)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in spec.build().parameters())
    assert n_params == shape.num_params()  # the performance model counts what is built
    spec.check_plan(Plan(tp=2, pp=2))
    with pytest.raises(ZhiluError, match="tp=4 must divide"):
        spec.check_plan(Plan(tp=4))
    tied = load(str(save_tiny(tmp_path / "tied", weights=False, tie_word_embeddings=True)))
    with pytest.raises(ZhiluError, match="ties"):
        tied.check_plan(Plan(pp=2))
    assert pickle.loads(pickle.dumps(spec)).build is not None  # a spec built in Python can go to other processes


def test_registry_resolves_hf_dir(tiny_llama_dir: Path) -> None:
    from zhilu.models.registry import resolve

    spec = resolve(f"hf:{tiny_llama_dir}")
    assert spec.source == f"hf:{tiny_llama_dir}" and spec.vocab_size == VOCAB


def test_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def main():\n    return 42\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = save_tiny(tmp_path / "tok", weights=False)
    tok.save(str(directory / "tokenizer.json"))
    spec = load(str(directory))
    text = "def main():\n    return 7 # ünïcode\n"
    ids = spec.tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids) and len(ids) < len(text.encode())
    assert spec.tokenizer.decode(ids) == text
    assert pickle.loads(pickle.dumps(spec.tokenizer)).encode(text) == ids
    n = tok.get_vocab_size()
    assert 256 < n <= 300
    small = save_tiny(tmp_path / "small", weights=False, vocab_size=n - 1)
    tok.save(str(small / "tokenizer.json"))
    expect_error(small, f"tokenizer.json has {n} tokens but config.json gives vocab_size={n - 1}")


def expect_error(directory: object, match: str) -> None:
    with pytest.raises(ZhiluError, match=match) as info:
        load(str(directory))
    assert info.value.field == "model.name" and "\n" not in str(info.value)


def test_errors_directory_and_config(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "no such directory; valid: hf:DIR")
    expect_error(tmp_path, "has no config.json")
    (tmp_path / "config.json").write_text("{not json")
    expect_error(tmp_path, "config.json is not valid JSON")


@pytest.mark.parametrize("config_cls,match", [
    ("ViTConfig", "model_type 'vit', not a causal language model transformers"),
    ("GPT2Config", "GPT2LMHeadModel is not supported by zhilu yet; valid: LlamaForCausalLM"),
])
def test_errors_architecture(tmp_path: Path, config_cls: str, match: str) -> None:
    getattr(transformers, config_cls)().save_pretrained(tmp_path)
    expect_error(tmp_path, match)


def test_errors_architecture_names(tmp_path: Path) -> None:
    save_tiny(tmp_path, weights=False)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForSequenceClassification"]}))
    expect_error(tmp_path, "LlamaForSequenceClassification, not a causal language model")
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "no-such-model", "architectures": []}))
    expect_error(tmp_path, "model_type 'no-such-model', not a causal language model")


def test_error_transformers_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    expect_error(tmp_path, r"needs transformers and safetensors \(transformers is not installed\); install them "
                           r"with pip install 'zhilu\[hf\]'")


def test_error_unknown_tp_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = {**transformers.LlamaConfig.base_model_tp_plan,
            "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce"}  # Qwen3's, which zhilu lacks
    monkeypatch.setattr(transformers.LlamaConfig, "base_model_tp_plan", plan)
    expect_error(save_tiny(tmp_path, weights=False), "'model.layers.*.self_attn.q_norm' as tensor-parallel style "
                                                     "'replicated_with_grad_allreduce', which zhilu cannot translate")


def test_errors_vocabulary_and_weights(tmp_path: Path) -> None:
    expect_error(save_tiny(tmp_path / "v", weights=False, vocab_size=200),
                 "trains on bytes, which needs a vocabulary of at least 256 and config.json gives vocab_size=200")
    (tmp_path / "sp").mkdir()
    save_tiny(tmp_path / "sp", weights=False)
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"x")
    expect_error(tmp_path / "sp", "has tokenizer.model but no tokenizer.json")
    other = save_tiny(tmp_path / "other", intermediate_size=96)
    target = save_tiny(tmp_path / "shape", weights=False)
    os.replace(other / "model.safetensors", target / "model.safetensors")
    expect_error(target, r"holds model.layers.0.mlp.gate_proj.weight of shape \[96, 64\] but config.json gives it "
                         r"\[128, 64\]")
    from safetensors.torch import load_file, save_file

    partial = save_tiny(tmp_path / "partial")
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    expect_error(partial, "the safetensors weights hold no 'model.norm.weight'")


# --- tensor parallelism: 2 processes on gloo, the HF attention on local q/k/v shards ---

def _tp_worker(rank: int, directories: list[str], store: str, out: str) -> None:
    import datetime
    import faulthandler

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from zhilu.parallel.tensor_parallel import apply_tensor_parallel

    faulthandler.dump_traceback_later(180, exit=True)  # a rank stuck in a collective fails the test, not hangs it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (2,))
        results = {}
        for directory in directories:
            spec = load(directory)
            model = spec.create(seed=11)
            assert not apply_tensor_parallel(model, mesh, spec.tp_plan, None, False)  # logits gathered
            assert model.layers["0"].self_attn.q_proj.weight.to_local().shape == (32, 64)  # 2 of 4 heads
            assert model.layers["0"].self_attn.k_proj.weight.to_local().shape == (16, 64)  # 1 of 2 kv heads
            x, y = tokens(), tokens(seed=2)
            logits = model(x)
            spec.loss(logits, y).backward()
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)  # collectives: every rank
                     for n, p in model.named_parameters()}
            results[directory] = {"logits": logits.detach(), "grads": grads,
                                  "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_two_processes_matches_one(tmp_path: Path) -> None:
    """tp=2 with the translated plan: Llama (embedding and lm_head split by vocabulary) and a tied
    Qwen2 (q/k/v biases; embedding and lm_head whole) give the logits and gradients of one process."""
    import torch.multiprocessing as mp

    directories = [str(save_tiny(tmp_path / "llama", weights=False)),
                   str(save_tiny(tmp_path / "qwen2", "qwen2", weights=False, tie_word_embeddings=True))]
    out = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(directories, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    assert "embed_tokens.weight" in results[directories[0]]["sharded"]
    assert "lm_head.weight" in results[directories[0]]["sharded"]
    assert "embed_tokens.weight" not in results[directories[1]]["sharded"]
    assert "layers.0.self_attn.q_proj.bias" in results[directories[1]]["sharded"]
    for directory in directories:
        spec = load(directory)
        model = spec.create(seed=11)
        x, y = tokens(), tokens(seed=2)
        logits = model(x)
        spec.loss(logits, y).backward()
        got = results[directory]
        torch.testing.assert_close(got["logits"], logits.detach(), rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == dict(model.named_parameters()).keys()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-7, msg=f"{directory}: {name}")


# --- zhilu train --model hf:DIR: every plan trains what one process trains ---

HF_JOB = ["--steps", "3", "--global-batch", "8", "--seq-len", "32", "--train.log_every", "1",
          "--train.eval_batches", "2", "--train.sample_tokens", "0"]


def train_hf(directory: Path, out: Path, *args: str) -> Path:
    from conftest import zhilu

    result = zhilu("train", "--model", f"hf:{directory}", *HF_JOB, "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def hf_final_params(directory: Path, run: Path) -> dict[str, torch.Tensor]:
    """The latest checkpoint of a run, whatever its layout, loaded into one whole model."""
    from zhilu.training.checkpoint import latest_checkpoint, load_model

    model = load(str(directory)).create()
    load_model(latest_checkpoint(run), model, no_dist=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_single_process(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_hf(tiny_llama_dir, tmp_path_factory.mktemp("hf-single") / "run")


@pytest.mark.parametrize("plan", ["dp=2", "dp=2,zero=3", "tp=2", "pp=2,mb=2"])
def test_train_hf_plan_matches_one_process(plan: str, tiny_llama_dir: Path, hf_single_process: Path,
                                           tmp_path: Path) -> None:
    from conftest import losses

    run = train_hf(tiny_llama_dir, tmp_path / "run", "--nproc", "2", "--plan", plan)
    got = torch.tensor(losses(run), dtype=torch.float64)
    want = torch.tensor(losses(hf_single_process), dtype=torch.float64)
    assert len(got) == len(want) == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    params, ref_params = hf_final_params(tiny_llama_dir, run), hf_final_params(tiny_llama_dir, hf_single_process)
    assert params.keys() == ref_params.keys()
    start = load(str(tiny_llama_dir)).create().state_dict()
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(p, start[name]), f"{name} did not train"
