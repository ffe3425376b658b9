"""The GPT decoder: shapes, causality, initialisation contract, parallelism hooks, training, generation."""

from __future__ import annotations

import copy

import pytest
import torch

from zhilu.errors import ZhiluError
from zhilu.models.gpt import GPT, build_model
from zhilu.models.gpt.spec import gpt_spec
from zhilu.spec import resolve_patterns, token_cross_entropy as loss_fn
from zhilu.training.sample import generate
from zhilu.models.presets import GPTConfig

TINY = GPTConfig(n_layers=2, hidden=32, n_heads=4, ffn_hidden=64, vocab_size=64, max_seq_len=32)
GQA = GPTConfig(n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=32)
TIED = GPTConfig(n_layers=2, hidden=32, n_heads=4, ffn_hidden=64, vocab_size=64, max_seq_len=32, tie_embeddings=True)


def tokens(b: int, t: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_same_parameters(a: GPT, b: GPT) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("cfg", [TINY, GQA, TIED], ids=["mha", "gqa", "tied"])
def test_forward_gives_logits_per_position(cfg: GPTConfig) -> None:
    model = build_model(cfg)
    assert model(tokens(2, 16)).shape == (2, 16, cfg.vocab_size)


def test_gqa_projects_fewer_key_value_heads() -> None:
    attention = build_model(GQA).layers["0"].attention
    assert attention.wk.out_features == attention.wv.out_features == GQA.kv_heads * GQA.head_dim == 16
    assert attention.wq.out_features == GQA.hidden


@pytest.mark.parametrize("cfg", [TINY, GQA], ids=["mha", "gqa"])
def test_logits_depend_only_on_earlier_tokens(cfg: GPTConfig) -> None:
    model = build_model(cfg)
    x = tokens(1, 16)
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % cfg.vocab_size
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_rejects_sequences_longer_than_max_seq_len() -> None:
    with pytest.raises(ValueError, match="max_seq_len=32"):
        build_model(TINY)(tokens(1, 33))


def test_invalid_config_is_a_user_error() -> None:
    with pytest.raises(ZhiluError) as err:
        GPT(GPTConfig(n_layers=1, hidden=30, n_heads=4, ffn_hidden=64))
    assert err.value.field == "model.n_heads"


@pytest.mark.parametrize("cfg", [TINY, TIED], ids=["untied", "tied"])
def test_meta_build_then_init_equals_direct_build(cfg: GPTConfig) -> None:
    torch.manual_seed(1)
    direct = GPT(cfg)
    torch.manual_seed(2)  # the global generator plays no part
    with torch.device("meta"):
        lazy = GPT(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert_same_parameters(direct, lazy)
    assert torch.equal(direct.rope_cos, lazy.rope_cos) and torch.equal(direct.rope_sin, lazy.rope_sin)
    assert (lazy.output.weight is lazy.tok_embeddings.weight) == cfg.tie_embeddings
    assert_same_parameters(direct, build_model(cfg, seed=0))


def test_a_partial_model_gets_exactly_its_share_of_the_whole() -> None:
    whole = build_model(TINY, seed=3)
    with torch.device("meta"):
        part = GPT(TINY)
    part.tok_embeddings = None
    del part.layers["0"]
    part.to_empty(device="cpu")
    part.init_weights(seed=3)
    whole_params = dict(whole.named_parameters())
    for name, p in part.named_parameters():
        assert torch.equal(p, whole_params[name]), name


def test_rope_tables_are_not_saved() -> None:
    assert not any("rope" in key for key in build_model(TINY).state_dict())


def test_seed_decides_parameters() -> None:
    assert_same_parameters(build_model(TINY, seed=1), build_model(TINY, seed=1))
    a, b = build_model(TINY, seed=1), build_model(TINY, seed=2)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)


def test_initialisation_scales() -> None:
    cfg = GPTConfig(n_layers=8, hidden=256, n_heads=4, ffn_hidden=512, vocab_size=512, max_seq_len=16)
    model = build_model(cfg)
    block = model.layers["3"]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert torch.equal(block.ffn_norm.weight, torch.ones(cfg.hidden))


@pytest.mark.parametrize("cfg", [TINY, TIED, GQA], ids=["untied", "tied", "gqa"])
def test_num_params_matches_config(cfg: GPTConfig) -> None:
    assert GPT(cfg).num_params == cfg.num_params()


def test_tp_plan_and_pipeline_split_name_real_modules() -> None:
    model = build_model(TINY)
    spec = gpt_spec(TINY)
    resolved = resolve_patterns(model, spec.tp_plan)
    assert len(resolved) == 2 + 7 * TINY.n_layers  # embedding, output and seven projections per block
    for name, style in resolved.items():
        module = model.get_submodule(name)
        assert style in ("colwise", "rowwise", "embedding", "output"), name
        assert isinstance(module, (torch.nn.Linear, torch.nn.Embedding)), name
    assert len(resolve_patterns(model, spec.sp_plan)) == 1 + 4 * TINY.n_layers
    for name in (*spec.pipeline.first, *spec.pipeline.last):
        model.get_submodule(name)
    assert list(spec.blocks_of(model)) == ["0", "1"]


def test_column_sharded_attention_heads_sum_to_the_full_output() -> None:
    """Half of the heads (wq/wk/wv column shards, wo row shard) per 'rank'; partial outputs add up."""
    model = build_model(GQA)
    attention = model.layers["0"].attention
    x = torch.randn(2, 8, GQA.hidden)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    partial_sum = torch.zeros(2, 8, GQA.hidden)
    for rank in range(2):
        shard = copy.deepcopy(attention)
        q_rows, kv_rows = slice(rank * 16, (rank + 1) * 16), slice(rank * 8, (rank + 1) * 8)
        for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
            getattr(shard, name).weight = torch.nn.Parameter(getattr(attention, name).weight[rows])
        shard.wo.weight = torch.nn.Parameter(attention.wo.weight[:, q_rows])
        partial_sum += shard(x, cos, sin)
    torch.testing.assert_close(partial_sum, attention(x, cos, sin))


def test_pipeline_stages_compose_to_the_full_model() -> None:
    model = build_model(TINY)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["1"]
    first.norm = first.output = None
    del last.layers["0"]
    last.tok_embeddings = None
    x = tokens(2, 12)
    hidden = first(x)
    assert hidden.shape == (2, 12, TINY.hidden)
    torch.testing.assert_close(last(hidden), model(x))


def test_one_adamw_step_lowers_the_loss() -> None:
    model = build_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tokens(4, 17)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    loss = loss_fn(model(inputs), targets)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.05)  # near uniform at init
    loss.backward()
    optimizer.step()
    assert loss_fn(model(inputs), targets).item() < loss.item()


def gen(model: GPT, prompt: torch.Tensor, n: int, **options: object) -> torch.Tensor:
    return generate(model, prompt, n, TINY.max_seq_len, **options)


def test_generate_keeps_the_prompt_and_appends_tokens() -> None:
    model = build_model(TINY)
    prompt = tokens(1, 5)
    out = gen(model, prompt, 40, generator=torch.Generator().manual_seed(0))  # beyond max_seq_len
    assert out.shape == (1, 45)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < TINY.vocab_size


def test_greedy_generation_is_deterministic_and_seeded_sampling_repeats() -> None:
    model = build_model(TINY)
    prompt = tokens(1, 5)
    greedy = gen(model, prompt, 10, temperature=0)
    assert torch.equal(greedy, gen(model, prompt, 10, temperature=0))
    assert int(greedy[0, 5]) == int(model(prompt)[0, -1].argmax())

    def sample(seed: int) -> torch.Tensor:
        return gen(model, prompt, 10, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(3), sample(3))


def test_top_1_sampling_is_greedy() -> None:
    model = build_model(TINY)
    prompt = tokens(1, 5)
    assert torch.equal(gen(model, prompt, 8, temperature=1.5, top_k=1), gen(model, prompt, 8, temperature=0))
