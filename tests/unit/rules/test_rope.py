"""The RoPE rules as pure functions: every rule and refusal, plus properties over generated configs."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.rules.checks import BadOption
from launcher.rules.configcheck import BadConfig
from launcher.rules.readers import ConfigClassRefusesType
from launcher.rules.rope import (
    ENGINE_TYPES,
    BadFactor,
    ExistingScalingUnsupported,
    MissingFactor,
    ReplacesScaling,
    RopeRequest,
    SessionBeyondScaling,
    ShrinksContext,
    UnknownRopeType,
    UnsupportedRopeType,
    YarnFactorRoundsAway,
    apply,
    decide,
    parse_factor,
    parse_rope_type,
    read_rope,
)


def llama(max_pos=4096, rope_scaling=None, **extra):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": max_pos,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
    }
    config.update(extra)
    return config


def changed_keys(decision):
    return {c.dotted for c in decision.changes}


# --- factor and type parsing ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0", "1", "1.0", "-2", "nan", "inf", "-inf", "abc", "", "0.5"])
def test_bad_factors_are_refused(text):
    with pytest.raises(BadFactor) as err:
        parse_factor(text)
    assert "greater than 1" in str(err.value)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("text, value", [("2", 2.0), ("1.5", 1.5), ("8", 8.0), (" 4 ", 4.0), (2.5, 2.5)])
def test_good_factors(text, value):
    assert parse_factor(text) == value


def test_bool_is_not_a_factor():
    with pytest.raises(BadFactor):
        parse_factor(True)


def test_rope_type_names():
    assert parse_rope_type("YaRN") == "yarn"
    for name in ("dynamic", "linear", "yarn", "llama3"):
        assert parse_rope_type(name) == name
    with pytest.raises(UnknownRopeType) as err:
        parse_rope_type("ntk")
    assert "dynamic, linear, yarn, llama3" in str(err.value)


# --- native context ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling, max_pos, native",
    [
        (None, 4096, 4096),
        ({"type": "default"}, 4096, 4096),
        ({"rope_type": "default", "rope_theta": 1e4}, 4096, 4096),
        ({"type": "dynamic", "factor": 2.0}, 32768, 32768),
        ({"type": "linear", "factor": 4.0}, 2048, 2048),
        ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072, 32768),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}, 131072, 8192),
        ({"type": "yarn", "factor": 4.0}, 32768, 32768),  # no original: max_position_embeddings is N
    ],
)
def test_native_context(scaling, max_pos, native):
    assert read_rope(llama(max_pos, scaling)).native_context == native


def test_absent_rope_scaling_key_means_none():
    config = llama()
    del config["rope_scaling"]
    state = read_rope(config)
    assert state.rope_type is None and state.native_context == 4096 and state.key == "rope_scaling"


@pytest.mark.parametrize(
    "config, problem",
    [
        ({"architectures": ["X"]}, "max_position_embeddings is missing"),
        (llama(max_pos=0), "max_position_embeddings must be a whole number from 1 to 2,147,483,647, found 0"),
        (llama(max_pos="4096"), "max_position_embeddings must be a whole number from 1 to 2,147,483,647, found '4096'"),
        (llama(rope_scaling="dynamic"), "rope_scaling must be an object or null"),
        (llama(rope_scaling={"type": "dynamic", "factor": "two"}), "factor must be a number"),
        ([1, 2], "must be a JSON object, found list"),
    ],
)
def test_configs_missing_facts_are_refused(config, problem):
    with pytest.raises(BadConfig) as err:
        read_rope(config, "x/config.json")
    assert problem in str(err.value) and "x/config.json" in str(err.value)


# --- what is written per type ----------------------------------------------------------------


def test_dynamic_keeps_max_position_embeddings():
    d = decide(llama(2048), RopeRequest(factor=2.0, rope_type="dynamic"))
    assert d.settings == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}
    assert d.max_position_embeddings == 2048
    assert d.session_len == 4096 and d.native_context == 2048
    assert changed_keys(d) == {"rope_scaling"}


def test_linear_keeps_max_position_embeddings():
    d = decide(llama(4096), RopeRequest(factor=4.0, rope_type="linear"))
    assert d.settings == {"type": "linear", "rope_type": "linear", "factor": 4.0}
    assert d.max_position_embeddings == 4096 and d.session_len == 16384


def test_yarn_raises_max_position_embeddings_and_records_original():
    d = decide(llama(32768), RopeRequest(factor=4.0, rope_type="yarn"))
    assert d.settings == {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert d.max_position_embeddings == 131072 and d.session_len == 131072
    assert changed_keys(d) == {"rope_scaling", "max_position_embeddings"}


def test_llama3_shape():
    d = decide(llama(8192), RopeRequest(factor=4.0, rope_type="llama3"))
    assert d.settings == {
        "type": "llama3", "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }
    assert d.max_position_embeddings == 32768


def test_qwen_card_recipe_is_repaired():
    """yarn x4 with original 32768 but max_position_embeddings 32768: TurboMind would read factor
    1.0 (max/original). launch raises max_position_embeddings to 131072."""
    recipe = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    d = decide(llama(32768, recipe), RopeRequest(factor=4.0, rope_type="yarn"))
    assert d.max_position_embeddings == 131072 and d.session_len == 131072
    assert d.settings["rope_type"] == "yarn" and d.settings["original_max_position_embeddings"] == 32768


def test_llama31_as_shipped_is_kept_and_serves_its_declared_context():
    shipped = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    d = decide(llama(131072, shipped), RopeRequest(factor=8.0, rope_type="llama3"))
    assert d.unchanged
    assert d.native_context == 8192 and d.session_len == 131072


def test_same_type_keeps_extra_keys():
    old = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 16}
    d = decide(llama(8192, old), RopeRequest(factor=4.0, rope_type="yarn"))
    assert d.settings["beta_fast"] == 16 and d.max_position_embeddings == 16384


def test_existing_dynamic_with_same_factor_is_unchanged():
    d = decide(llama(32768, {"type": "dynamic", "factor": 2.0}), RopeRequest(factor=2.0))
    assert d.unchanged and d.session_len == 65536 and d.rope_type == "dynamic"


def test_type_defaults_to_existing_then_dynamic():
    assert decide(llama(4096, {"type": "linear", "factor": 2.0}), RopeRequest(factor=4.0)).rope_type == "linear"
    assert decide(llama(4096), RopeRequest(factor=2.0)).rope_type == "dynamic"


def test_factor_defaults_to_existing():
    d = decide(llama(32768, {"type": "dynamic", "factor": 3.0}), RopeRequest())
    assert d.factor == 3.0 and d.unchanged


def test_no_factor_anywhere_is_an_error():
    with pytest.raises(MissingFactor):
        decide(llama(4096), RopeRequest())


# --- where it is written ------------------------------------------------------------------------


def test_transformers5_rope_parameters_are_patched_in_place():
    config = llama(4096)
    del config["rope_scaling"], config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    d = decide(config, RopeRequest(factor=2.0, rope_type="yarn"))
    assert d.key == "rope_parameters"
    patched = apply(config, d)
    assert "rope_scaling" not in patched
    assert patched["rope_parameters"] == {
        "rope_theta": 500000.0, "type": "yarn", "rope_type": "yarn", "factor": 2.0,
        "original_max_position_embeddings": 4096,
    }
    assert patched["max_position_embeddings"] == 8192


@pytest.mark.parametrize("nest", ["text_config", "llm_config", "language_config"])
def test_multimodal_configs_are_patched_in_the_language_model(nest):
    config = {"architectures": ["SomeVLM"], "vision_config": {"hidden_size": 8}, nest: llama(4096)}
    d = decide(config, RopeRequest(factor=2.0, rope_type="yarn"))
    patched = apply(config, d)
    assert patched[nest]["rope_scaling"]["factor"] == 2.0
    assert patched[nest]["max_position_embeddings"] == 8192
    assert "rope_scaling" not in patched and "max_position_embeddings" not in patched
    assert changed_keys(d) == {f"{nest}.rope_scaling", f"{nest}.max_position_embeddings"}


# --- InternLM v1 ------------------------------------------------------------------------------


def internlm_v1():
    return {
        "architectures": ["InternLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm.InternLMConfig",
            "AutoModel": "modeling_internlm.InternLMForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
        },
        "bias": True,
        "model_type": "internlm",
        "max_position_embeddings": 2048,
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "rope_scaling": None,
    }


def test_internlm_v1_becomes_llama_with_attention_bias():
    config = internlm_v1()
    d = decide(config, RopeRequest(factor=2.0))
    patched = apply(config, d)
    assert patched["architectures"] == ["LlamaForCausalLM"]
    assert patched["model_type"] == "llama"
    assert patched["attention_bias"] is True and patched["mlp_bias"] is False
    assert patched["rope_theta"] == 10000.0
    assert "auto_map" not in patched
    assert d.session_len == 4096
    assert config == internlm_v1()  # the input is not modified


def test_internlm_v1_rotary_base_becomes_rope_theta_and_tokenizer_map_is_kept():
    config = internlm_v1()
    config["rotary"] = {"base": 20000, "type": "dynamic"}
    config["auto_map"]["AutoTokenizer"] = ["tokenization_internlm.InternLMTokenizer", None]
    patched = apply(config, decide(config, RopeRequest(factor=2.0)))
    assert patched["rope_theta"] == 20000.0
    assert patched["auto_map"] == {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]}


def test_internlm_v1_without_bias_gets_no_attention_bias():
    config = internlm_v1()
    config["bias"] = False
    assert apply(config, decide(config, RopeRequest(factor=2.0)))["attention_bias"] is False


# --- refusals -----------------------------------------------------------------------------------


def test_replacing_another_type_is_refused_then_allowed_with_force():
    llama31 = llama(131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(ReplacesScaling) as err:
        decide(llama31, RopeRequest(factor=16.0, rope_type="dynamic"))
    assert "--type llama3" in str(err.value) and "--force" in str(err.value)
    d = decide(llama31, RopeRequest(factor=16.0, rope_type="dynamic", force=True))
    assert d.settings == {"type": "dynamic", "rope_type": "dynamic", "factor": 16.0}
    assert d.max_position_embeddings == 8192  # back to the NTK threshold N
    assert any("replacing" in w for w in d.warnings)


def test_shrinking_is_refused_then_allowed_with_force():
    config = llama(32768, {"type": "linear", "factor": 2.0})
    with pytest.raises(ShrinksContext) as err:
        decide(config, RopeRequest(factor=1.5))
    assert "49152" in str(err.value) and "65536" in str(err.value)
    d = decide(config, RopeRequest(factor=1.5, force=True))
    assert d.session_len == 49152 and any("shrinking" in w for w in d.warnings)


def test_a_smaller_dynamic_factor_is_honoured_with_a_note_of_what_the_config_had():
    # InternLM3-8B-Instruct ships dynamic x6; lmdeploy serves that config at N (it never multiplies
    # by the factor) and dynamic NTK is training-free: x4 is a legitimate choice, not a shrink.
    internlm3 = llama(32768, {"rope_type": "dynamic", "factor": 6.0})
    d = decide(internlm3, RopeRequest(factor=4.0))
    assert d.session_len == 131072 and d.settings["factor"] == 4.0 and d.max_position_embeddings == 32768
    assert d.warnings == ("the config had dynamic x6 (196608 tokens); writing dynamic x4 as asked (131072 tokens)",)
    # trained scalings still refuse a shrink, and so does replacing the type
    for trained in ({"rope_type": "linear", "factor": 6.0},
                    {"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 32768}):
        config = llama(32768 if trained["rope_type"] == "linear" else 196608, trained)
        with pytest.raises(ShrinksContext):
            decide(config, RopeRequest(factor=4.0))
    with pytest.raises(ReplacesScaling):
        decide(internlm3, RopeRequest(factor=4.0, rope_type="linear"))


def test_llama3_factor_that_declares_less_than_shipped_is_a_shrink():
    llama31 = llama(131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(ShrinksContext):
        decide(llama31, RopeRequest(factor=12.0, rope_type="llama3"))
    assert decide(llama31, RopeRequest(factor=16.0, rope_type="llama3")).session_len == 131072


def test_existing_type_launch_cannot_extend_is_refused():
    with pytest.raises(ExistingScalingUnsupported) as err:
        decide(llama(4096, {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}),
               RopeRequest(factor=2.0, force=True))
    assert "longrope" in str(err.value)


def test_type_the_engine_lacks_is_refused(monkeypatch):
    monkeypatch.setitem(ENGINE_TYPES, "turbomind", ("default", "linear", "dynamic", "llama3"))
    with pytest.raises(UnsupportedRopeType) as err:
        decide(llama(4096), RopeRequest(factor=2.0, rope_type="yarn"))
    assert "turbomind" in str(err.value)


def test_unknown_backend_is_refused():
    with pytest.raises(BadOption):
        decide(llama(4096), RopeRequest(factor=2.0, engine="vllm"))


# --- session length -----------------------------------------------------------------------------


def test_session_len_default_is_n_times_f_rounded():
    assert decide(llama(262144), RopeRequest(factor=2.5)).session_len == 655360
    assert decide(llama(1000), RopeRequest(factor=1.5)).session_len == 1500


def test_larger_session_len_is_a_warning_for_dynamic():
    d = decide(llama(32768), RopeRequest(factor=2.0, session_len=200000))
    assert d.session_len == 200000
    assert any("no published recipe serves this model there: dynamic NTK keeps extrapolating" in w for w in d.warnings)


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3"])
def test_larger_session_len_is_refused_for_other_types_unless_forced(rope_type):
    with pytest.raises(SessionBeyondScaling) as err:
        decide(llama(8192), RopeRequest(factor=2.0, rope_type=rope_type, session_len=20000))
    assert "16384" in str(err.value) and "--force" in str(err.value)
    d = decide(llama(8192), RopeRequest(factor=2.0, rope_type=rope_type, session_len=20000, force=True))
    assert d.session_len == 20000 and d.warnings


def test_smaller_session_len_is_allowed_and_within_native_warns():
    assert decide(llama(8192), RopeRequest(factor=2.0, session_len=10000)).warnings == ()
    d = decide(llama(8192), RopeRequest(factor=2.0, session_len=4096))
    assert d.session_len == 4096 and any("within the native" in w for w in d.warnings)


@pytest.mark.parametrize("value", [0, -5])
def test_nonpositive_session_len_is_refused(value):
    with pytest.raises(BadOption):
        decide(llama(8192), RopeRequest(factor=2.0, session_len=value))


# --- properties over generated configs ------------------------------------------------------------

scalings = st.one_of(
    st.none(),
    st.just({"type": "default"}),
    st.builds(lambda f: {"type": "dynamic", "factor": f}, st.sampled_from([1.5, 2.0, 3.0])),
    st.builds(lambda f: {"rope_type": "linear", "factor": f}, st.sampled_from([2.0, 4.0])),
)
requests = st.builds(
    RopeRequest,
    factor=st.one_of(st.none(), st.floats(min_value=1.01, max_value=64, allow_nan=False)),
    rope_type=st.one_of(st.none(), st.sampled_from(["dynamic", "linear", "yarn", "llama3"])),
    session_len=st.none(),
    force=st.booleans(),
)


@st.composite
def configs(draw):
    config = llama(draw(st.sampled_from([512, 2048, 4096, 32768, 131072])), draw(scalings))
    family = draw(st.sampled_from(["llama", "internlm", "internlm2", "qwen2_vl"]))
    if family == "internlm":
        config["architectures"] = ["InternLMForCausalLM"]
        config["bias"] = draw(st.booleans())
    elif family == "internlm2":
        config.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2")
    elif family == "qwen2_vl" and config["rope_scaling"] is None:
        config["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    if draw(st.booleans()):  # transformers 5 layout
        config["rope_parameters"] = dict(config.pop("rope_scaling") or {"rope_type": "default"})
        config["rope_parameters"]["rope_theta"] = config.pop("rope_theta")
    if draw(st.booleans()):
        config = {"architectures": ["VLM"], "vision_config": {}, draw(st.sampled_from(
            ["text_config", "llm_config", "language_config"])): config}
    return config


def _decide_or_none(config, request):
    try:
        return decide(config, request)
    except (MissingFactor, ReplacesScaling, ShrinksContext, ConfigClassRefusesType, YarnFactorRoundsAway):
        return None


@settings(max_examples=300, deadline=None)
@given(configs(), requests)
def test_patching_is_idempotent_and_never_mutates_the_source(config, request):
    original = copy.deepcopy(config)
    first = _decide_or_none(config, request)
    assert config == original
    if first is None:
        return
    patched = apply(config, first)
    assert config == original
    # the dict written is one the model's own class takes: exactly its keys where it allows no others
    type_keys = {k for k in ("type", "rope_type") if k in first.settings}
    if first.reader.only is not None and first.key == "rope_scaling":
        assert set(first.settings) <= set(first.reader.only)
        assert type_keys == set(first.reader.type_keys)
    assert type_keys and first.rope_type in first.reader.types
    # the written config always parses back, as JSON and as RoPE state
    reparsed = json.loads(json.dumps(patched))
    state = read_rope(reparsed)
    assert state.rope_type == first.rope_type
    assert state.factor == first.factor
    assert state.native_context == first.native_context
    assert state.max_position_embeddings == first.max_position_embeddings
    # applying the same settings again changes nothing
    again = decide(reparsed, RopeRequest(factor=first.factor, rope_type=first.rope_type, force=request.force))
    assert again.unchanged, again.changes
    assert apply(reparsed, again) == reparsed
    assert again.session_len == first.session_len
    # the served context never shrinks unless forced (or dynamic on dynamic: training-free)
    if not request.force and not (first.before.rope_type == first.rope_type == "dynamic"):
        assert first.covered_context >= read_rope(original).served_context
    assert math.isclose(first.covered_context / first.native_context, first.factor, rel_tol=0.01) or (
        first.unchanged and first.rope_type in ("yarn", "llama3")
    )


def test_the_one_config_number_checker():
    from launcher.rules.configcheck import INT32_MAX, depth_within, real_number, whole_number

    assert whole_number(4096) == 4096 and whole_number(4096.0) == 4096
    for bad in (0, -1, True, "4096", 2.5, float("nan"), float("inf"), 10**400, INT32_MAX + 1, None, [1]):
        with pytest.raises(ValueError):
            whole_number(bad)
    assert real_number(1e6) == 1e6 and real_number(0, low_open=False) == 0.0
    for bad in (0, -1.0, True, "1", float("nan"), 1e300, 10**400):
        with pytest.raises(ValueError):
            real_number(bad)
    nested: object = 1
    for _ in range(64):
        nested = {"x": nested}
    assert depth_within(nested) and not depth_within({"x": nested})
    assert not depth_within([[[[]]]], limit=3) and depth_within([[[]]], limit=3)


def test_a_factor_whose_context_passes_int32_is_refused():
    from launcher.rules.rope import ContextTooLong

    for factor in (1e305, 1e308, 2**31):
        with pytest.raises(ContextTooLong) as err:
            decide(llama(256, None), RopeRequest(factor=factor))
        assert "2147483647" in str(err.value)
    assert decide(llama(256, None), RopeRequest(factor=(2**31 - 1) / 256)).session_len == 2**31 - 1


# --- the reader: the shape each model's own config class accepts (issue 15) ------------------------


def internlm2(rope_scaling=None, **extra):
    config = llama(32768, rope_scaling, architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                   rope_theta=1000000, **extra)
    config["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config"}
    return config


def test_the_seed_case_gets_the_two_field_form_internlm2s_class_takes():
    d = decide(internlm2(None), RopeRequest(factor=2.0))
    assert d.settings == {"type": "dynamic", "factor": 2.0}
    assert d.reader.name == "InternLM2Config" and d.reader.code == "configuration_internlm2.py"
    assert isinstance(apply(internlm2(None), d)["rope_scaling"]["factor"], float)


def test_internlm2_over_a_shipped_dynamic_and_over_an_older_three_key_overlay():
    assert decide(internlm2({"type": "dynamic", "factor": 2.0}), RopeRequest(factor=3.0)).settings == {
        "type": "dynamic", "factor": 3.0}
    # an overlay of an earlier launch wrote three keys: the same settings are rewritten in the class's shape
    d = decide(internlm2({"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}), RopeRequest(factor=2.0))
    assert not d.unchanged and d.settings == {"type": "dynamic", "factor": 2.0}


@pytest.mark.parametrize("request_", [RopeRequest(), RopeRequest(factor=2.0)])
def test_an_integer_factor_is_written_as_the_float_internlm2s_class_requires(request_):
    # {"factor": 2} == {"factor": 2.0} in Python: the check is on what apply() writes, as JSON writes it
    config = internlm2({"type": "dynamic", "factor": 2})
    d = decide(config, request_)
    assert not d.unchanged and changed_keys(d) == {"rope_scaling"}
    written = apply(config, d)["rope_scaling"]
    assert json.dumps(written) == '{"type": "dynamic", "factor": 2.0}'
    assert type(written["factor"]) is float
    again = apply(apply(config, d), decide(apply(config, d), request_))
    assert json.dumps(again["rope_scaling"]) == json.dumps(written)  # and then it stays


def test_an_integer_factor_in_the_other_key_is_rewritten_too():
    # both keys present: rope_scaling is read, rope_parameters is kept consistent, each as JSON writes it
    config = llama(4096, {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0},
                   rope_parameters={"rope_type": "dynamic", "factor": 2, "rope_theta": 10000.0})
    d = decide(config, RopeRequest(factor=2.0))
    assert changed_keys(d) == {"rope_parameters"}
    assert type(apply(config, d)["rope_parameters"]["factor"]) is float
    # transformers' own classes: an int factor in a dict already in their shape is written as a float
    plain = llama(4096, {"type": "dynamic", "rope_type": "dynamic", "factor": 2})
    assert json.dumps(apply(plain, decide(plain, RopeRequest(factor=2.0)))["rope_scaling"]).endswith('"factor": 2.0}')


def test_every_value_launch_sets_is_compared_as_json_writes_it():
    # a float max_position_embeddings and an integer attention_bias are == to what launch sets, not the same JSON
    config = llama(4096.0)
    written = apply(config, decide(config, RopeRequest(factor=2.0)))
    assert json.dumps(written["max_position_embeddings"]) == "4096"
    v1 = {**internlm_v1(), "attention_bias": 1}
    assert json.dumps(apply(v1, decide(v1, RopeRequest(factor=2.0)))["attention_bias"]) == "true"

@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
@pytest.mark.parametrize("force", [False, True])
def test_types_internlm2s_class_cannot_hold_are_refused_force_or_not(rope_type, force):
    from launcher.rules.readers import ConfigClassRefusesType

    for config in (internlm2(None), internlm2({"type": "dynamic", "factor": 2.0})):
        with pytest.raises(ConfigClassRefusesType) as err:
            decide(config, RopeRequest(factor=4.0, rope_type=rope_type, force=force))
        text = str(err.value)
        assert "InternLM2Config" in text and "dynamic, linear" in text and "\n" not in text


def test_internlm2_found_by_architecture_alone_and_inside_internvl():
    bare = internlm2(None)
    del bare["model_type"], bare["auto_map"]
    assert decide(bare, RopeRequest(factor=2.0)).reader.name == "InternLM2Config"
    vl = {"architectures": ["InternVLChatModel"], "llm_config": internlm2(None), "text_config": llama(4096),
          "vision_config": {}}
    d = decide(vl, RopeRequest(factor=2.0))
    assert d.section == ("llm_config",) and d.settings == {"type": "dynamic", "factor": 2.0}
    assert changed_keys(d) == {"llm_config.rope_scaling"}
    assert any("text_config" in w and "llm_config" in w for w in d.warnings)


def test_internlm2_extra_keys_in_the_shipped_dict_are_refused():
    from launcher.rules.readers import ConfigClassRefusesKeys

    with pytest.raises(ConfigClassRefusesKeys) as err:
        decide(internlm2({"type": "dynamic", "factor": 2.0, "rope_theta": 1e6}), RopeRequest(factor=3.0))
    assert "rope_theta" in str(err.value) and "type, factor" in str(err.value)


def test_internlm3_gets_rope_type_only_and_every_type():
    config = llama(32768, {"rope_type": "dynamic", "factor": 6.0}, architectures=["InternLM3ForCausalLM"],
                   model_type="internlm3")
    assert decide(config, RopeRequest(factor=6.0)).unchanged
    d = decide(config, RopeRequest(factor=2.0, rope_type="yarn", force=True))
    assert d.reader.name == "InternLM3Config"
    assert "type" not in d.settings and d.settings["rope_type"] == "yarn"


def test_transformers_own_classes_get_the_pair_and_keep_a_shipped_single_key():
    d = decide(llama(4096), RopeRequest(factor=2.0))
    assert d.reader.name == "LlamaConfig" and not d.reader.remote
    assert d.settings == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}


def unknown_class(rope_scaling):
    """A checkpoint whose own config class (auto_map) launch has not read."""
    return llama(4096, rope_scaling, model_type="baichuan",
                 auto_map={"AutoConfig": "org/repo--configuration_baichuan.BaichuanConfig"})


def test_a_class_launch_does_not_know_gets_dynamic_or_linear_in_the_shipped_key_style_with_a_warning():
    d = decide(unknown_class({"type": "linear", "factor": 2.0}), RopeRequest(factor=4.0))
    assert (d.reader.name, d.reader.code, d.reader.known) == ("BaichuanConfig", "configuration_baichuan.py", False)
    assert d.settings == {"type": "linear", "factor": 4.0}
    [note] = [w for w in d.warnings if "does not know" in w]
    assert "BaichuanConfig" in note and "configuration_baichuan.py" in note and "\n" not in note
    assert "launch serve reads the overlay with that class before loading any weight" in note
    # the key style shipped: rope_type alone stays rope_type alone; none shipped: the two-field form
    assert decide(unknown_class({"rope_type": "dynamic", "factor": 2.0}), RopeRequest(factor=4.0)).settings == {
        "rope_type": "dynamic", "factor": 4.0}
    assert decide(unknown_class(None), RopeRequest(factor=2.0)).settings == {"type": "dynamic", "factor": 2.0}
    # nothing written, nothing to warn about
    same = decide(unknown_class({"type": "dynamic", "factor": 2.0}), RopeRequest(factor=2.0))
    assert same.unchanged and not any("does not know" in w for w in same.warnings)


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
@pytest.mark.parametrize("force", [False, True])
def test_yarn_and_llama3_are_refused_for_a_class_launch_does_not_know_force_or_not(rope_type, force):
    # measured (lmdeploy 0.18): when such a class refuses a yarn / llama3 dict, get_model_arch's generic
    # fallback raises AttributeError (no max_position_embeddings) instead of reading it
    with pytest.raises(ConfigClassRefusesType) as err:
        decide(unknown_class(None), RopeRequest(factor=4.0, rope_type=rope_type, force=force))
    text = str(err.value)
    assert "BaichuanConfig" in text and "not one launch knows" in text and "--force or not" in text
    assert "generic fallback cannot read" in text and "--type dynamic" in text and "\n" not in text


def phi3(rope_scaling=None, auto_map="configuration_phi3.Phi3Config"):
    config = llama(4096, rope_scaling, architectures=["Phi3ForCausalLM"], model_type="phi3",
                   original_max_position_embeddings=4096)
    if auto_map:
        config["auto_map"] = {"AutoConfig": auto_map}
    return config


@pytest.mark.parametrize("auto_map", ["configuration_phi3.Phi3Config",
                                      "microsoft/Phi-3-mini-4k-instruct--configuration_phi3.Phi3Config", None])
@pytest.mark.parametrize("rope_type", [None, "dynamic", "linear", "yarn", "llama3"])
@pytest.mark.parametrize("force", [False, True])
def test_phi3s_class_holds_none_of_the_types_launch_writes(auto_map, rope_type, force):
    # Phi-3's configuration_phi3.py (and transformers' own Phi3Config, without auto_map) take only
    # {"type": "longrope", "short_factor": [...], "long_factor": [...]} (su and yarn are renamed longrope)
    with pytest.raises(ConfigClassRefusesType) as err:
        decide(phi3(None, auto_map), RopeRequest(factor=2.0, rope_type=rope_type, force=force))
    text = str(err.value)
    assert "Phi3Config" in text and "holds only longrope" in text and "\n" not in text
    assert "none of the types launch writes (dynamic, linear, yarn, llama3)" in text
    assert ("configuration_phi3.py" in text) is (auto_map is not None)


def test_the_whole_configs_own_class_is_named_beside_the_language_models():
    # InternVL whose LLM is Qwen2: its llm_config is read by Qwen2Config, inside InternVLChatConfig, the
    # checkpoint's own code that AutoConfig runs first (so trust_remote_code is needed for it)
    qwen2 = llama(32768, None, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    vl = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": qwen2,
          "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}, "vision_config": {}}
    d = decide(vl, RopeRequest(factor=2.0))
    assert d.reader.name == "Qwen2Config" and not d.reader.remote
    assert (d.outer.name, d.outer.code, d.outer.known) == ("InternVLChatConfig", "configuration_internvl_chat.py", True)
    assert d.remote_class == d.outer and not any("does not know" in w for w in d.warnings)
    vl_il2 = {**vl, "llm_config": internlm2(None)}
    assert decide(vl_il2, RopeRequest(factor=2.0)).remote_class.name == "InternVLChatConfig"
    # one level: the class is the reader; transformers' own all the way: nothing remote
    plain = decide(internlm2(None), RopeRequest(factor=2.0))
    assert plain.outer is None and plain.remote_class == plain.reader
    assert decide(llama(4096), RopeRequest(factor=2.0)).remote_class is None
    nested = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "text_config": qwen2}
    assert decide(nested, RopeRequest(factor=2.0)).outer is None
    # an outer class launch has not read gets the same warning as any other
    other = {**vl, "auto_map": {"AutoConfig": "configuration_wrapper.WrapperConfig"}}
    [note] = [w for w in decide(other, RopeRequest(factor=2.0)).warnings if "does not know" in w]
    assert "WrapperConfig" in note


def test_internlm_v1_is_read_by_transformers_llama_after_the_rewrite():
    d = decide(internlm_v1(), RopeRequest(factor=2.0))
    assert d.reader.name == "LlamaConfig" and d.settings["rope_type"] == "dynamic"


# --- nothing the model needs is dropped ---------------------------------------------------------


@pytest.mark.parametrize("shipped", [
    {"type": "mrope", "mrope_section": [16, 24, 24]},
    {"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 24], "mrope_interleaved": True},
])
@pytest.mark.parametrize("rope_type", ["dynamic", "yarn"])
def test_mrope_is_no_scaling_and_its_section_is_kept(shipped, rope_type):
    config = llama(32768, shipped, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl")
    assert read_rope(config).rope_type is None
    d = decide(config, RopeRequest(factor=2.0, rope_type=rope_type))
    assert d.settings["mrope_section"] == [16, 24, 24] and d.settings["rope_type"] == rope_type
    assert d.settings.get("mrope_interleaved") == shipped.get("mrope_interleaved")
    # and it stays through a forced change of type
    again = decide(apply(config, d), RopeRequest(factor=2.0, rope_type="linear", force=True))
    assert again.settings["mrope_section"] == [16, 24, 24]


def test_a_rope_theta_inside_the_dict_survives_a_forced_change_of_type():
    config = llama(4096, {"type": "dynamic", "factor": 2.0, "rope_theta": 250000.0})
    del config["rope_theta"]
    d = decide(config, RopeRequest(factor=2.0, rope_type="linear", force=True))
    assert d.settings["rope_theta"] == 250000.0


@pytest.mark.parametrize("theta", [3.58e9, 1e12, 2**31, 5e37])
def test_any_finite_positive_float32_base_is_taken(theta):
    assert decide(llama(8192, None, rope_theta=theta), RopeRequest(factor=2.0)).factor == 2.0


@pytest.mark.parametrize("theta", [0, -1.0, float("inf"), 1e39, "1e6", True])
def test_a_base_out_of_range_is_refused(theta):
    with pytest.raises(BadConfig) as err:
        decide(llama(8192, None, rope_theta=theta), RopeRequest(factor=2.0))
    assert "rope_theta" in str(err.value)


# --- both keys ------------------------------------------------------------------------------------


def both_keys():
    config = llama(4096, {"type": "linear", "factor": 2.0})
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                 "rope_theta": 500000.0}
    return config


def test_with_both_keys_the_one_transformers_reads_first_is_the_one_read():
    state = read_rope(both_keys())
    assert (state.key, state.mirror, state.rope_type, state.factor) == ("rope_scaling", "rope_parameters", "linear", 2.0)
    # an empty or null rope_scaling is skipped by transformers (``rope_scaling or rope_parameters``)
    for empty in (None, {}):
        config = both_keys()
        config["rope_scaling"] = empty
        assert read_rope(config).key == "rope_parameters" and read_rope(config).rope_type == "yarn"


def test_with_both_keys_both_are_written_alike_with_the_base_kept():
    config = both_keys()
    d = decide(config, RopeRequest(factor=4.0))
    patched = apply(config, d)
    assert changed_keys(d) == {"rope_scaling", "rope_parameters"}
    scaling, params = patched["rope_scaling"], patched["rope_parameters"]
    assert scaling["rope_type"] == params["rope_type"] == "linear" and scaling["factor"] == params["factor"] == 4.0
    assert scaling["rope_theta"] == params["rope_theta"] == 500000.0
    assert "original_max_position_embeddings" not in params  # stale yarn keys go with the old type
    assert decide(patched, RopeRequest(factor=4.0)).factor == 4.0  # and it reads back the same


# --- yarn's factor is the ratio TurboMind reads -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(native=st.integers(min_value=64, max_value=1 << 20), factor=st.floats(min_value=1.001, max_value=64))
def test_yarn_writes_a_factor_that_is_exactly_the_ratio_turbomind_reads(native, factor):
    from launcher.rules.rope import YarnFactorRoundsAway

    try:
        d = decide(llama(native), RopeRequest(factor=factor, rope_type="yarn"))
    except YarnFactorRoundsAway:
        assert round(native * factor) == native
        return
    original = d.settings["original_max_position_embeddings"]
    assert d.max_position_embeddings / original == d.factor == d.settings["factor"]
    assert abs(d.factor - factor) * native <= 0.5 + 1e-6
    assert (d.factor != factor) == any("written as" in w for w in d.warnings)


def test_a_yarn_factor_that_rounds_to_one_is_refused():
    from launcher.rules.rope import YarnFactorRoundsAway

    with pytest.raises(YarnFactorRoundsAway) as err:
        decide(llama(4097), RopeRequest(factor=1.0001, rope_type="yarn"))
    assert "x1 (no extension)" in str(err.value)
