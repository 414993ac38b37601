"""--context: what the RoPE rules are asked for, and what they then write (pure: no files, no servers)."""

from __future__ import annotations

import pytest

from launcher.rules.context import Asked, ContextPastFactor, Recipe, ask
from launcher.rules.prefixcache import PrefixCachingUnsafe, check_prefix_caching, prefix_caching_safe
from launcher.rules.rope import ReplacesScaling, decide, read_rope

QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768,
        "rope_theta": 1e6, "rope_scaling": None, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "hidden_size": 3584}
INTERNLM2_5 = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "max_position_embeddings": 32768,
               "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
ONE_M = {**INTERNLM2_5, "max_position_embeddings": 262144, "rope_theta": 5e7,
         "rope_scaling": {"type": "dynamic", "factor": 2.5}}
LLAMA31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 131072,
           "rope_theta": 5e5, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "hidden_size": 4096, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
RECIPE_1M = Recipe("OpenCompass lmdeploy_internlm2_5_7b_chat_1m.py", 1048576, "dynamic", 2.5,
                   {"tp": 4, "max_batch_size": 1, "cache_max_entry_count": 0.7})


def asked(config, *, context=None, factor=None, rope_type=None, session_len=None, preset=(None, None),
          recipe=None) -> Asked:
    return ask(read_rope(config), context=context, factor=factor, rope_type=rope_type, session_len=session_len,
               preset_type=preset[0], preset_factor=preset[1], recipe=recipe)


def planned(config, **kwargs):
    a = asked(config, **kwargs)
    return a, decide(config, a.rope)


def test_qwen_at_64k_is_yarn_x2_with_65536_positions():
    a, d = planned(QWEN, context=65536, preset=("yarn", 4.0))
    assert (d.rope_type, d.factor, d.session_len, d.max_position_embeddings) == ("yarn", 2.0, 65536, 65536)
    assert d.settings["original_max_position_embeddings"] == 32768 and not d.warnings
    assert a.how == "65,536 / 32,768 native tokens = x2, yarn (the preset's type)"


def test_the_factor_is_exact_not_rounded_up():
    _, d = planned(INTERNLM2_5, context=100 * 1024, preset=("dynamic", 2.0))
    assert d.factor == 102400 / 32768 == 3.125 and d.session_len == 102400 and not d.warnings
    assert d.settings == {"type": "dynamic", "factor": 3.125}


@pytest.mark.parametrize("config, context", [(QWEN, 16384), (QWEN, 32768), (INTERNLM2_5, 49152),
                                             (INTERNLM2_5, 65536), (LLAMA31, 65536), (LLAMA31, 131072)])
def test_a_context_the_config_covers_leaves_it_unchanged_and_sets_the_session(config, context):
    a, d = planned(config, context=context, preset=("yarn", 4.0) if config is QWEN else (None, None))
    assert a.rope.keep and d.unchanged and d.session_len == context and not d.warnings
    assert d.settings == config.get("rope_scaling")  # None stays None


def test_without_scaling_the_decision_is_the_default_rope():
    _, d = planned(QWEN, context=8192)
    assert (d.rope_type, d.factor, d.covered_context) == ("default", 1.0, 32768)


def test_the_type_asked_for_is_written_only_past_native():
    a, d = planned(INTERNLM2_5, context=16384, rope_type="linear")
    assert d.unchanged and "--type linear changes nothing there" in a.how
    with pytest.raises(ReplacesScaling):  # past native, linear would replace the shipped dynamic (--force)
        planned(INTERNLM2_5, context=65536, rope_type="linear")


def test_the_type_falls_back_preset_then_config_then_dynamic():
    assert asked(QWEN, context=65536, preset=("yarn", 4.0)).rope.rope_type == "yarn"
    assert asked(QWEN, context=65536).rope.rope_type == "dynamic"
    assert asked(QWEN, context=65536, rope_type="linear", preset=("yarn", 4.0)).rope.rope_type == "linear"
    assert asked(INTERNLM2_5, context=131072).rope.rope_type == "dynamic"  # the config's
    _, d = planned(LLAMA31, context=262144)  # Llama 3.1 keeps its llama3 scaling, over its original 8,192
    assert (d.rope_type, d.factor, d.session_len) == ("llama3", 32.0, 262144)


def test_the_published_1m_recipe_is_the_default_and_past_n_x_f_it_is_no_warning():
    a, d = planned(ONE_M, preset=("dynamic", 2.5), recipe=RECIPE_1M)
    assert a.recipe is RECIPE_1M and d.session_len == 1048576 and d.unchanged and not d.warnings
    a, d = planned(ONE_M, context=1048576, preset=("dynamic", 2.5), recipe=RECIPE_1M)
    assert (d.rope_type, d.factor, d.session_len) == ("dynamic", 2.5, 1048576) and not d.warnings
    assert a.recipe is RECIPE_1M and "published recipe" in a.how
    a, d = planned(ONE_M, context=2 * 1048576, preset=("dynamic", 2.5), recipe=RECIPE_1M)
    assert (d.factor, d.session_len, a.recipe) == (8.0, 2097152, None)  # past the recipe: derived


def test_a_recipe_applies_only_to_its_own_scaling():
    a, d = planned(ONE_M, factor=3.0, preset=("dynamic", 2.5), recipe=RECIPE_1M)
    assert a.recipe is None and d.session_len == 3 * 262144
    a, d = planned(ONE_M, factor=3.0, session_len=1048576, preset=("dynamic", 2.5), recipe=RECIPE_1M)
    assert any("no published recipe" in w for w in d.warnings)


def test_a_covering_recipe_vouches_for_sessions_but_is_no_default():
    covering = Recipe("InternLM chat/lmdeploy.md", 200000, "dynamic", 2.0, default=False)
    a, d = planned(INTERNLM2_5, preset=("dynamic", 2.0), recipe=covering)
    assert a.recipe is None and d.session_len == 65536
    _, d = planned(INTERNLM2_5, session_len=200000, preset=("dynamic", 2.0), recipe=covering)
    assert not d.warnings
    _, d = planned(INTERNLM2_5, session_len=200001, preset=("dynamic", 2.0), recipe=covering)
    assert len(d.warnings) == 1 and "untested by launch" in d.warnings[0] and "quality" not in d.warnings[0]
    a, d = planned(INTERNLM2_5, context=131072, preset=("dynamic", 2.0), recipe=covering)
    assert (d.factor, d.session_len, a.recipe) == (4.0, 131072, None)  # it chooses no factor: N / native


def test_a_recipe_within_n_x_f_leaves_the_factor_to_be_derived():
    card = Recipe("Qwen2.5 card", 131072, "yarn", 4.0)
    _, d = planned(QWEN, context=65536, preset=("yarn", 4.0), recipe=card)
    assert d.factor == 2.0  # a static type's smaller factor changes short texts less


def test_a_context_past_the_largest_factor_is_refused_in_one_line():
    v1 = {**QWEN, "max_position_embeddings": 2048}
    with pytest.raises(ContextPastFactor) as info:
        asked(v1, context=4 * 1048576)
    assert "x2048 of the native 2,048" in str(info.value) and "\n" not in str(info.value)


# --- prefix caching: refused exactly where a session can pass the dynamic-NTK threshold -------------


@pytest.mark.parametrize("rope_type, session, max_pos, safe", [
    ("dynamic", 65536, 32768, False), ("dynamic", 32769, 32768, False), ("dynamic", 32768, 32768, True),
    ("dynamic", 1024, 32768, True), ("yarn", 131072, 131072, True), ("linear", 65536, 32768, True),
    ("llama3", 131072, 131072, True), ("default", 32768, 32768, True),
])
def test_prefix_caching_is_safe_unless_dynamic_past_the_threshold(rope_type, session, max_pos, safe):
    assert prefix_caching_safe(rope_type, session, max_pos) is safe
    if safe:
        check_prefix_caching(rope_type, 2.0, session, max_pos)
    else:
        with pytest.raises(PrefixCachingUnsafe) as info:
            check_prefix_caching(rope_type, 2.0, session, max_pos)
        assert "--type yarn" in str(info.value) and "\n" not in str(info.value)


def test_the_recipes_engine_values_go_with_a_session_past_n_x_f_only():
    a = asked(ONE_M, session_len=65536, preset=("dynamic", 2.5), recipe=RECIPE_1M)
    assert a.recipe is None and a.rope.published_session == 1048576  # a 64k session needs no 1M layout
    assert asked(ONE_M, session_len=800000, preset=("dynamic", 2.5), recipe=RECIPE_1M).recipe is RECIPE_1M
    assert asked(ONE_M, context=65536, preset=("dynamic", 2.5), recipe=RECIPE_1M).recipe is None
