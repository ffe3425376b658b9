"""Model states per ZeRO stage and per-stage parameters, against hand counts."""

import pytest

from zhilu.models.presets import GPTConfig
from zhilu.perf.flops import Transformer
from zhilu.perf.memory import GIB, state_bytes, stage_params

P = 1e9


@pytest.mark.parametrize("zero,expected", [
    (0, (2 * P, 4 * P, 12 * P)),  # bf16 weights, fp32 gradients, fp32 master + two Adam moments
    (1, (2 * P, 4 * P, 12 * P / 8)),  # optimizer state partitioned
    (2, (2 * P, 4 * P / 8, 12 * P / 8)),  # and gradients
    (3, (2 * P / 8, 4 * P / 8, 12 * P / 8)),  # and weights
])
def test_mixed_precision_states_per_zero_stage(zero, expected):
    assert state_bytes(P, "bf16", zero, dp=8) == pytest.approx(expected)


def test_fp32_keeps_no_master_copy():
    assert state_bytes(P, "fp32", 0, dp=4) == (4 * P, 4 * P, 8 * P)
    assert state_bytes(P, "fp32", 3, dp=4) == (P, P, 2 * P)


def test_korthikanti_fig1_weights_and_optimizer_of_the_22b_model():
    # 48 layers of 12 h^2 over 8 tensor-parallel devices, 18 bytes each: 45.56 GiB in Fig. 1
    cfg = GPTConfig(n_layers=48, hidden=6144, n_heads=64, ffn_hidden=4 * 6144, vocab_size=51200,
                    max_seq_len=2048, tie_embeddings=True)
    m = Transformer(cfg, 2048, gated_mlp=False, rotary=False)
    layers_only = 48 * 12 * 6144 ** 2 / 8
    params = stage_params(m, 8, 48, first=True, last=True, pp=1)
    assert sum(state_bytes(layers_only, "bf16", 0, 1)) / GIB == pytest.approx(45.5625, rel=1e-4)
    # norms and one (tied) embedding table on top of the layers
    assert params == pytest.approx(layers_only + 48 * 2 * 6144 / 8 + 51200 * 6144 / 8 + 6144)


def test_a_tied_output_layer_is_a_second_copy_on_another_stage():
    cfg = GPTConfig(n_layers=4, hidden=64, n_heads=4, ffn_hidden=128, vocab_size=100, tie_embeddings=True)
    m = Transformer(cfg, 16)
    one_stage = stage_params(m, 1, 4, True, True, pp=1)
    first, last = stage_params(m, 1, 2, True, False, pp=2), stage_params(m, 1, 2, False, True, pp=2)
    assert first + last == one_stage + 100 * 64
