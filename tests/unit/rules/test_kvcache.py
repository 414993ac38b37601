"""The KV-cache planner against hand-computed numbers (lmdeploy 0.18 TurboMind's formula)."""

from __future__ import annotations

import pytest

from launcher.rules.configcheck import BadConfig
from launcher.rules.kvcache import (
    GiB,
    ModelShape,
    bytes_per_session,
    bytes_per_token,
    kv_costs,
    largest_session,
    plan_memory,
)

INTERNLM2_5 = ModelShape(layers=32, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")


def test_internlm2_5_65536_tokens_fp16_is_8_gib():
    assert bytes_per_token(INTERNLM2_5) == 131072  # 32 x 2 x 8 x 128 x 2
    assert bytes_per_session(INTERNLM2_5, 65536) == 8 * GiB


@pytest.mark.parametrize("quant, per_token", [(0, 131072), (8, 32 * 2 * 8 * (128 + 4)), (4, 32 * 2 * 8 * (64 + 4))])
def test_quantized_kv_adds_4_bytes_per_head(quant, per_token):
    assert bytes_per_token(INTERNLM2_5, quant_policy=quant) == per_token


@pytest.mark.parametrize("tp, per_token", [(1, 131072), (2, 65536), (8, 16384), (16, 16384)])
def test_tensor_parallel_splits_kv_heads_and_repeats_them_below_tp(tp, per_token):
    assert bytes_per_token(INTERNLM2_5, tp=tp) == per_token


def test_sessions_are_whole_64_token_blocks():
    assert bytes_per_session(INTERNLM2_5, 100) == 128 * 131072
    assert bytes_per_session(INTERNLM2_5, 128) == 128 * 131072
    assert bytes_per_session(INTERNLM2_5, 129) == 192 * 131072


def test_shape_from_config_defaults():
    shape = ModelShape.from_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256})
    assert (shape.kv_heads, shape.head_dim) == (4, 64)


def test_fit_counts_full_sessions_in_the_budget():
    weights = 15 * GiB
    m = plan_memory(INTERNLM2_5, session_len=65536, gpu_bytes=80 * GiB, weights_bytes=weights)
    assert m.budget_bytes == int((80 - 15) * GiB * 0.8)  # 52 GiB
    assert m.sessions == 6 and m.fits and m.advice == ()
    assert m.largest_session_len == (52 * GiB // 131072) // 64 * 64


def test_no_fit_gives_the_largest_session_and_what_else_would_fit():
    # 24 GiB GPU, 15 GiB weights: budget (24 - 15) x 0.8 = 7.2 GiB; a 65536 session needs 8 GiB fp16
    m = plan_memory(INTERNLM2_5, session_len=65536, gpu_bytes=24 * GiB, weights_bytes=15 * GiB,
                    native_context=32768)
    assert not m.fits and m.sessions == 0
    budget = int(9 * GiB * 0.8)
    largest = (budget // 131072) // 64 * 64
    assert m.largest_session_len == largest == 58944
    assert m.advice[0] == f"--session-len {largest} (the largest that fits)"
    assert "--quant-policy 8 (int8 KV cache)" in m.advice  # 4.125 GiB per session
    assert any(a.startswith("--tp 2") for a in m.advice)  # (24 - 7.5) x 0.8 = 13.2 GiB >= 4 GiB
    assert "--factor 1.79 (a smaller factor)" in m.advice  # 58944 / 32768


def test_more_tp_is_not_advised_beyond_the_gpus_present():
    m = plan_memory(INTERNLM2_5, session_len=65536, gpu_bytes=24 * GiB, weights_bytes=15 * GiB, gpu_count=1)
    assert not any(a.startswith("--tp") for a in m.advice)


def test_weights_that_fill_the_gpu_leave_nothing():
    m = plan_memory(INTERNLM2_5, session_len=4096, gpu_bytes=10 * GiB, weights_bytes=12 * GiB)
    assert m.budget_bytes == 0 and m.largest_session_len == 0
    assert any("more memory" in a or a.startswith("--tp") for a in m.advice)


def test_kv_costs_table():
    costs = kv_costs(INTERNLM2_5, 65536)
    assert [c.name for c in costs.values()] == ["fp16", "int8", "int4"]
    assert costs[0].bytes_per_session == 8 * GiB
    assert largest_session(8 * GiB, 131072) == 65536


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"num_key_value_heads": 8}, "num_key_value_heads must be a whole number from 1 to 4, found 8"),
        ({"num_key_value_heads": "abc"}, "found 'abc'"),
        ({"head_dim": [128]}, "head_dim must be a whole number from 1 to 1,048,576, found [128]"),
        ({"num_attention_heads": -4}, "num_attention_heads must be a whole number"),
        ({"num_hidden_layers": True}, "found True"),
        ({"hidden_size": 2}, "hidden_size must be a whole number from 4"),  # fewer than the heads: head_dim 0
        ({"torch_dtype": 16}, "torch_dtype must be text, found 16"),
    ],
)
def test_model_shape_numbers_have_a_type_and_a_range(changes, needle):
    section = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, **changes}
    with pytest.raises(BadConfig) as err:
        ModelShape.from_config(section, "m/config.json")
    assert str(err.value).startswith("m/config.json: ") and needle in str(err.value)


def test_model_shape_defaults_and_whole_floats():
    shape = ModelShape.from_config({"num_hidden_layers": 2.0, "hidden_size": 64, "num_attention_heads": 4})
    assert shape == ModelShape(layers=2, heads=4, kv_heads=4, head_dim=16, dtype="bfloat16")
    assert bytes_per_token(shape) == 2 * 2 * 4 * 16 * 2 > 0


# --- context parallelism (cp): lmdeploy 0.18 TurboMind, attn_tp = tp / cp, tokens interleaved over cp ---------

INTERNLM3 = ModelShape(layers=48, heads=32, kv_heads=2, head_dim=128, dtype="bfloat16")


def test_cp_splits_the_tokens_and_the_heads_go_over_attn_tp_by_hand():
    # InternLM3, tp 8: 2 KV heads repeated to 1 per GPU -> 48 x 2 x 1 x 128 x 2 = 24,576 B per token held,
    # and a 131,072-token session holds all of its tokens on every GPU: 3 GiB.
    assert bytes_per_token(INTERNLM3, tp=8) == 48 * 2 * 1 * 128 * 2
    assert bytes_per_session(INTERNLM3, 131072, tp=8) == 131072 * 24576 == 3 * GiB
    # tp 8, cp 2: attn_tp 4, still 1 KV head per GPU, but each GPU holds 131,072 / 2 tokens: 1.5 GiB.
    assert bytes_per_token(INTERNLM3, tp=8, cp=2) == 24576
    assert bytes_per_session(INTERNLM3, 131072, tp=8, cp=2) == 65536 * 24576
    # InternLM2.5 (8 KV heads), tp 8, cp 2: 2 heads per GPU over half the tokens = the same bytes as cp 1.
    assert bytes_per_token(INTERNLM2_5, tp=8, cp=2) == 32 * 2 * 2 * 128 * 2
    assert bytes_per_session(INTERNLM2_5, 65536, tp=8, cp=2) == bytes_per_session(INTERNLM2_5, 65536, tp=8)
    # a session's share is whole 64-token blocks: 129 tokens over cp 2 -> 65 tokens -> 2 blocks
    assert bytes_per_session(INTERNLM3, 129, tp=8, cp=2) == 128 * 24576


def test_cp_keeps_the_attention_weights_on_each_of_its_gpus():
    from launcher.rules.kvcache import attention_weight_bytes, weights_per_gpu

    # q and o: 4096 x 4096 each; k and v: 4096 x (2 x 128) each; 48 layers, 2 bytes
    attention = 48 * (4096 * 4096 * 2 + 2 * 4096 * 256) * 2
    assert attention_weight_bytes(INTERNLM3) == attention
    weights = 16 * GiB
    assert weights_per_gpu(INTERNLM3, weights, tp=8) == 2 * GiB
    assert weights_per_gpu(INTERNLM3, weights, tp=8, cp=2) == -(-((weights - attention) / 8 + attention / 4) // 1)


def test_the_largest_session_counts_every_cp_share():
    assert largest_session(3 * GiB, 24576, cp=2) == 2 * largest_session(3 * GiB, 24576)


def test_cp_is_advised_where_it_makes_a_session_fit():
    # tp 8 with 2 KV heads: each GPU holds a whole session of repeated heads; cp 2 halves it
    m = plan_memory(INTERNLM3, session_len=1048576, gpu_bytes=24 * GiB, weights_bytes=16 * GiB, tp=8,
                    cache_max_entry_count=0.9)
    assert not m.fits and any(tip.startswith("--cp 2") for tip in m.advice), m.advice
    fits = plan_memory(INTERNLM3, session_len=1048576, gpu_bytes=24 * GiB, weights_bytes=16 * GiB, tp=8, cp=2,
                       cache_max_entry_count=0.9)
    assert fits.fits and fits.cp == 2
