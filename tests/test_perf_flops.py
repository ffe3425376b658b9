"""The work of one layer: FLOPs, parameters and saved activations against hand counts."""

import pytest

from zhilu.models.presets import GPTConfig, preset
from zhilu.perf.flops import Transformer

H, S = 1024, 512


def gpt(layers=1, tied=False):
    cfg = GPTConfig(n_layers=layers, hidden=H, n_heads=16, ffn_hidden=4 * H, vocab_size=1000, max_seq_len=S,
                    tie_embeddings=tied)
    return Transformer(cfg, S, gated_mlp=False, rotary=False, dropout=True)


def test_forward_flops_of_a_gpt_layer_are_24_h_squared_per_token():
    # QKV 3h^2, output h^2, MLP 2 * 4h^2 multiply-adds per token: 2 * 12 h^2 FLOPs
    assert sum(2 * n * k for n, k in gpt().gemms(tp=1)) == 24 * H * H


def test_tensor_parallelism_splits_every_product():
    assert sum(2 * n * k for n, k in gpt().gemms(tp=4)) == 24 * H * H // 4


def test_model_flops_reuse_the_mfu_convention_of_gptconfig():
    llama = preset("llama3-8b")
    assert Transformer(llama, 4096).model_flops_per_token == llama.flops_per_token(4096)
    m = gpt(layers=2)
    # 6 per weight of every product (12 h^2 per layer, plus the output layer) + 12 L h s for attention
    assert m.model_flops_per_token == 6 * (2 * 12 * H * H + 1000 * H) + 12 * 2 * H * S


def test_model_flops_per_token_are_gptconfigs_for_every_preset():
    from zhilu.models.presets import PRESETS

    for name, cfg in PRESETS.items():
        for seq_len in (256, cfg.max_seq_len):
            assert Transformer(cfg, seq_len).model_flops_per_token == cfg.flops_per_token(seq_len), name


def test_causal_attention_executes_half_the_score_matrix():
    # Q K^T and P V: 4 b s^2 h multiply-add FLOPs, of which the unmasked half
    assert gpt().attention_flops(micro_batch=2, tp=1) == 4 * 2 * S * S * H / 2
    assert gpt().attention_flops(micro_batch=2, tp=4) == 4 * 2 * S * S * H / 2 / 4


def test_layer_parameters():
    assert gpt().layer_params == 12 * H * H + 2 * H
    llama = Transformer(preset("llama3-8b"), 8192)
    assert llama.layer_params == 218_112_000  # Llama 3 8B: (8.03e9 - 2 * 128256 * 4096 - 4096) / 32


@pytest.mark.parametrize("tp", [1, 8])
def test_activations_follow_korthikanti_without_recompute(tp):
    # Korthikanti et al. 2022, eq. 2: s b h (10 + 24/t + 5 a s / (h t)) bytes per layer (tensor parallel)
    m, a = gpt(), 16
    per_token = m.saved_bytes_per_token(tp, sp=False, fused=True, flash=False, recompute="none")
    assert per_token == pytest.approx(H * (10 + 24 / tp + 5 * a * S / (H * tp)))


def test_sequence_parallelism_divides_every_activation_by_t():
    m, a, t = gpt(), 16, 8
    per_token = m.saved_bytes_per_token(t, sp=True, fused=True, flash=False, recompute="none")
    assert per_token == pytest.approx(H * (34 / t + 5 * a * S / (H * t)))


def test_selective_recompute_drops_the_attention_core_and_full_keeps_the_input():
    m, t = gpt(), 8
    assert m.saved_bytes_per_token(t, True, True, False, "attention") == pytest.approx(34 * H / t)
    assert m.saved_bytes_per_token(t, False, True, False, "full") == 2 * H
    assert m.saved_bytes_per_token(t, True, True, False, "full") == 2 * H / t


def test_flash_attention_keeps_no_score_matrix():
    m = gpt()
    unfused = m.saved_bytes_per_token(1, False, True, False, "none")
    flash = m.saved_bytes_per_token(1, False, True, True, "none")
    assert unfused - flash == pytest.approx(5 * 16 * S - 4 * 16)  # scores gone, fp32 log-sum-exp kept


def test_eager_kernels_move_more_bytes_than_fused_ones():
    m = Transformer(preset("llama3-8b"), 8192)
    fused_fwd, fused_bwd, _, _ = m.memory_bound_ops(fused=True, tp=1, sp=False)
    eager_fwd, eager_bwd, _, _ = m.memory_bound_ops(fused=False, tp=1, sp=False)
    assert eager_fwd > 2 * fused_fwd and eager_bwd > 2 * fused_bwd


def test_a_bad_shape_is_a_user_error():
    from zhilu.errors import ZhiluError

    with pytest.raises(ZhiluError) as e:
        Transformer(GPTConfig(n_layers=2, hidden=100, n_heads=3, ffn_hidden=64), 128)
    assert e.value.field == "model.n_heads"


def test_one_product_per_weight_has_the_flops_of_the_fused_products():
    llama = Transformer(preset("llama3-8b"), 4096)  # 32 heads, 8 kv-heads of 128
    for tp in (1, 8):
        fused, apart = llama.gemm_groups(tp, fused=True), llama.gemm_groups(tp, fused=False)
        assert [sum(n * k for n, k in g) for g in fused] == [sum(n * k for n, k in g) for g in apart]
    qkv, _, up, _ = llama.gemm_groups(8, fused=False)
    assert qkv == ((4096 // 8, 4096), (1024 // 8, 4096), (1024 // 8, 4096))  # wq, wk, wv
    assert up == ((14336 // 8, 4096),) * 2  # w1, w3
