"""Contract with the INSTALLED lmdeploy and transformers: launch's overlays are read the way the engines
read them (``get_model_arch`` with the model's own config class, TurboMind's text-config choice,
``parse_rope_param``, the PyTorch engine's rotary parameters), and every reader gets exactly the RoPE
type, factor, threshold, base and mrope section launch planned, for every preset and type and for the
shapes of issue 15. The model's own class must accept the overlay: lmdeploy's generic fallback is a
failure, not a pass.

The readers run in a separate process (tests/contract/lmdeploy_contract.py) because TurboMind's parser is
only importable on a CPU machine with a stand-in for its CUDA extension module, which must not leak
into this process. Remote-code config classes (InternLM2, InternLM3, InternVL) come from
tests/support/remote_code/: small classes applying the published validation rules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.model.presets import preset_files
from launcher.rules.rope import WRITABLE_TYPES

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    work = tmp_path_factory.mktemp("contract")
    env = {"PYTHONPATH": str(HERE.parents[1]), "LAUNCH_CACHE_DIR": str(work / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(work), "HF_HUB_OFFLINE": "1", "LAUNCH_PRESETS_DIR": str(work / "no-user-presets")}
    result = subprocess.run([sys.executable, str(HERE / "lmdeploy_contract.py"), str(work)],
                            capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def served(contract):
    return [r for r in contract["records"] if "refused" not in r]


def by_name(contract, name, rope_type=None):
    found = [r for r in contract["records"] if r["name"] == name and (rope_type is None or r["rope_type"] == rope_type)]
    assert len(found) == 1, (name, rope_type, len(found))
    return found[0]


def _read(r):
    return (r["type"], round(r["factor"], 12), r["threshold"], r["base"], r["mrope_section"])


def test_the_standin_only_stood_in_for_the_cuda_extension(contract):
    # the subprocess reached TurboMind's Python parser through the stand-in extension module
    assert contract["standin_in_use"] is True


def test_every_preset_and_type_was_checked(contract):
    seen = {(r["preset"], r["rope_type"]) for r in contract["records"] if r["preset"] and not r["context"]}
    assert seen == {(name, t) for name in preset_files() for t in WRITABLE_TYPES}
    assert len(served(contract)) >= 45  # the cases that were written and read, not refused


def test_nothing_was_read_through_lmdeploys_fallback_and_every_own_class_accepts(contract):
    for record in served(contract):
        where = f"{record['name']} {record['rope_type']}"
        assert "read_error" not in record, (where, record.get("read_error"))
        assert record["own_class"]["accepted"], (where, record["own_class"])
        assert record["fallback"] is False, where


def test_the_class_plan_names_is_the_class_that_reads_the_language_model(contract):
    for record in served(contract):
        named = record["reader"]["class"]
        # the whole config's class (Qwen2-VL's validates its text part) or the language model's own
        # (InternVL's llm_config is built by InternLM2Config)
        read_by = (record["loaded_class"], record["turbomind_text_class"])
        assert named in read_by, (record["name"], record["rope_type"], named, read_by)


@pytest.mark.parametrize("engine", ["turbomind", "pytorch"])
def test_engines_read_the_intended_type_factor_threshold_base_and_mrope(contract, engine):
    for record in served(contract):
        want = record["intended"]
        assert _read(record[engine]) == _read(want), f"{record['name']} {record['rope_type']} ({engine})"


def test_the_seed_case_is_the_seed_fix_read_through_internlm2s_own_class(contract):
    seed = by_name(contract, "internlm2-null-seed")
    assert seed["written"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert seed["loaded_class"] == "InternLM2Config" and seed["reader"]["remote_code"] == "configuration_internlm2.py"
    assert _read(seed["turbomind"]) == ("dynamic", 2.0, 32768, 1e6, None)
    again = by_name(contract, "internlm2-dynamic2-to-3")
    assert again["written"]["rope_scaling"] == {"type": "dynamic", "factor": 3.0}


def test_types_internlm2s_class_cannot_hold_are_refused_and_nothing_is_written(contract):
    refused = [r for r in contract["records"] if "refused" in r]
    assert {(r["name"], r["rope_type"]) for r in refused} == (
        {(name, t) for name in preset_files() if name.startswith("internlm2") for t in ("yarn", "llama3")}
        | {("internlm2-yarn", "yarn"), ("internlm2-llama3", "llama3")}
    )
    for record in refused:  # --force was given to every one of them
        assert record["refused"] == "ConfigClassRefusesType"
        assert record["wrote"] == []
        assert "InternLM2Config" in record["message"] and "\n" not in record["message"]


def test_mrope_sections_survive_and_both_engines_read_them(contract):
    for name in ("qwen2-vl-mrope-dynamic", "qwen2-vl-mrope-yarn", "qwen2-vl-saved-dynamic"):
        record = by_name(contract, name)
        assert record["turbomind"]["mrope_section"] == [16, 24, 24], name
        assert record["pytorch"]["mrope_section"] == [16, 24, 24], name
        assert record["turbomind"]["type"] == record["intended"]["type"] != "default", name


def test_with_both_keys_the_key_read_is_patched_and_the_other_agrees(contract):
    record = by_name(contract, "llama-both-keys")
    written = record["written"]
    assert written["rope_scaling"]["rope_type"] == written["rope_parameters"]["rope_type"] == "linear"
    assert written["rope_scaling"]["factor"] == written["rope_parameters"]["factor"] == 4.0
    assert record["turbomind"]["base"] == 500000.0  # kept only in rope_parameters as shipped
    forced = by_name(contract, "llama-both-keys-force-yarn")
    assert _read(forced["turbomind"])[:3] == ("yarn", 4.0, 4096)


def test_a_rope_theta_inside_the_dict_survives_force(contract):
    assert by_name(contract, "llama-theta-inside-force-linear")["turbomind"]["base"] == 250000.0


def test_a_base_above_int32_is_taken(contract):
    assert by_name(contract, "llama-theta-3.58e9")["turbomind"]["base"] == 3.58e9


def test_a_yarn_factor_is_written_as_the_ratio_turbomind_reads(contract):
    record = by_name(contract, "llama-yarn-odd-native")
    assert record["written"]["max_position_embeddings"] == 6146  # round(4097 * 1.5)
    assert record["turbomind"]["factor"] == record["pytorch"]["factor"] == 6146 / 4097


def test_internvl_gets_its_llm_config_patched(contract):
    record = by_name(contract, "internvl-llm-config")
    assert record["section"] == ["llm_config"]
    assert record["written"]["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert record["written"]["text_config"]["rope_scaling"] is None  # left as shipped: no reader takes it
    assert record["loaded_class"] == "InternVLChatConfig" and record["turbomind_text_class"] == "InternLM2Config"


def test_the_text_config_choices_mirror_the_installed_source(contract):
    internvl = contract["internvl_source"]
    assert internvl.index("'llm_config'") < internvl.index("'text_config'")
    assert "getattr(cfg, 'text_config', cfg)" in contract["qwen2_vl_source"]
    assert "vision_config" in contract["source_model_config_source"]


def test_internlm_v1_rewrite_lands_on_a_turbomind_architecture(contract):
    v1 = by_name(contract, "internlm-chat-7b", "dynamic")
    assert v1["arch"] == "LlamaForCausalLM"
    assert v1["turbomind_is_supported"] is True
    assert v1["turbomind"]["base"] == 10000.0


def test_turbomind_support_answers_match_lmdeploy(contract):
    answers = {r["name"]: r["turbomind_is_supported"] for r in served(contract) if r["preset"]}
    assert answers["mistral-7b-instruct-v0.2"] is False  # why that preset uses the PyTorch engine
    assert answers["qwen2.5-7b-instruct"] is True and answers["llama-3.1-8b-instruct"] is True
    assert answers["internlm2_5-7b-chat"] is True  # through InternLM2's own class, with trust_remote_code


def test_launch_tables_match_lmdeploy(contract):
    assert contract["launch_turbomind_archs"] == contract["turbomind_archs"]
    assert contract["launch_turbomind_rope_types"] == contract["turbomind_rope_types"]


def test_the_hand_written_qwen_recipe_is_what_launch_repairs(contract):
    # yarn x4 with max_position_embeddings left at 32768: TurboMind reads factor 1.0
    assert contract["qwen_card_recipe_turbomind_factor"] == 1.0
    qwen = by_name(contract, "qwen2.5-7b-instruct", "yarn")
    assert qwen["turbomind"]["factor"] == 4.0


# --- --context: the overlays it writes are read as intended (issue 18) ------------------------------


def context_records(contract):
    return [r for r in contract["records"] if r["context"]]


def test_every_context_overlay_is_written_and_read_as_the_session_asked(contract):
    records = context_records(contract)
    assert {r["context_of"] for r in records} == set(preset_files())
    for record in records:
        where = record["name"]
        assert "refused" not in record, (where, record.get("message"))
        assert record["session_len"] == record["context"], where
        assert record["own_class"]["accepted"] and record["fallback"] is False, where
        for engine in ("turbomind", "pytorch"):
            assert _read(record[engine]) == _read(record["intended"]), (where, engine)


def test_a_context_within_native_writes_no_scaling(contract):
    within = [r for r in context_records(contract) if r["context"] <= r["native"]]
    assert {r["context_of"] for r in within} == set(preset_files())  # half the native context, for each
    for record in within:
        assert record["rope_written"] is False, record["name"]
    qwen = by_name(contract, "qwen2.5-7b-instruct@16384")
    assert qwen["unchanged"] and qwen["turbomind"]["type"] == qwen["pytorch"]["type"] == "default"


def test_qwen_at_64k_is_yarn_x2_as_both_engines_read_it(contract):
    record = by_name(contract, "qwen2.5-7b-instruct@65536")
    assert record["written"]["rope_scaling"]["factor"] == 2.0 and record["written"]["max_position_embeddings"] == 65536
    # both engines: yarn x2 over the original 32,768 (TurboMind derives its factor as 65,536 / 32,768)
    assert _read(record["turbomind"])[:3] == _read(record["pytorch"])[:3] == ("yarn", 2.0, 32768)
    assert record["turbomind"]["max_position_embeddings"] == 65536


def test_the_1m_recipe_is_dynamic_x2_5_at_1m_read_by_internlm2s_class_without_a_warning(contract):
    record = by_name(contract, "internlm2_5-7b-chat-1m@1048576")
    assert record["unchanged"] is True and record["session_len"] == 1048576  # the shipped x2.5, as published
    assert record["loaded_class"] == "InternLM2Config"
    assert _read(record["turbomind"])[:3] == ("dynamic", 2.5, 262144)
    assert not any("recipe" in w or "extrapolat" in w for w in record["plan_warnings"]), record["plan_warnings"]
