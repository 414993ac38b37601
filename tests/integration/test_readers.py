"""`plan` and `patch` name who reads the overlay, write the shape that reader takes, and refuse before
writing anything when it would not be read as planned (issue 15), through the real CLI."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import INTERNVL_QWEN2, assert_one_line_error, tree_state

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

REMOTE_CODE = Path(__file__).resolve().parents[1] / "support" / "remote_code"


def internlm2_checkpoint(root: Path, rope_scaling=None) -> Path:
    """A local InternLM2 checkpoint as published: config.json naming its own config class, and that
    class's code (tests/support/remote_code: the published validation rule)."""
    d = root / "internlm2-tiny"
    d.mkdir()
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
              "max_position_embeddings": 32768, "rope_theta": 1000000, "rope_scaling": rope_scaling,
              "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 100, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(config))
    shutil.copy(REMOTE_CODE / "configuration_internlm2.py", d / "configuration_internlm2.py")
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def test_the_seed_case_patch_writes_what_internlm2s_own_class_loads(launch, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = internlm2_checkpoint(tmp_path)
    before = tree_state(src)
    result = launch("patch", str(src), "--factor", "2", "--trust-remote-code", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    overlay = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((overlay / "config.json").read_text())["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert "read by: InternLM2Config (the model's own code, configuration_internlm2.py)" in result.stderr
    config = transformers.AutoConfig.from_pretrained(str(overlay), trust_remote_code=True)
    assert type(config).__name__ == "InternLM2Config"
    assert config.rope_parameters["factor"] == 2.0 and config.rope_parameters["rope_type"] == "dynamic"
    assert tree_state(src) == before


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_a_type_internlm2s_class_cannot_hold_is_refused_before_anything_is_written(launch, tmp_path, rope_type):
    src = internlm2_checkpoint(tmp_path, {"type": "dynamic", "factor": 2.0})
    before = tree_state(src)
    out = tmp_path / "out"
    for command in ("patch", "plan"):
        args = [command, str(src), "--factor", "4", "--type", rope_type, "--force", "--trust-remote-code"]
        result = launch(*args, *(["--out", str(out)] if command == "patch" else []))
        assert_one_line_error(result, "InternLM2Config", "cannot hold", "--type dynamic", code=2)
        assert not out.exists()
    assert tree_state(src) == before
    # the same for the preset, with no file at all
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "4", "--type", rope_type, "--force")
    assert_one_line_error(result, "InternLM2Config", code=2)


def test_plan_names_the_reader_and_the_path_lmdeploy_takes(launch, tmp_path):
    src = internlm2_checkpoint(tmp_path)
    trusted = json.loads(launch("plan", str(src), "--factor", "2", "--trust-remote-code", "--json").stdout)
    assert trusted["reader"]["class"] == "InternLM2Config" and trusted["reader"]["read_through"] == "own class"
    assert trusted["reader"]["only_keys"] == ["type", "factor"]
    assert not any("generic fallback" in w for w in trusted["warnings"])
    untrusted = json.loads(launch("plan", str(src), "--factor", "2", "--json").stdout)
    assert untrusted["reader"]["read_through"] == "generic fallback"
    assert any("--trust-remote-code" in w and "generic fallback" in w for w in untrusted["warnings"])
    text = launch("plan", "llama-3-8b-instruct", "--factor", "2").stdout
    assert "read by        LlamaConfig (transformers' own), then lmdeploy's turbomind engine" in text


def test_a_yarn_factor_is_planned_as_the_ratio_turbomind_reads(launch):
    data = json.loads(launch("plan", "llama-3-8b-instruct", "--factor", "1.1", "--type", "yarn", "--json").stdout)
    assert data["max_position_embeddings"] == 9011 and data["factor"] == 9011 / 8192
    assert data["rope_scaling"]["factor"] == data["factor"] and data["session_len"] == 9011
    assert any("9,011 / 8,192" in w for w in data["warnings"])


def test_an_integer_factor_is_patched_into_the_float_internlm2s_class_requires(launch, tmp_path):
    # {"factor": 2} is == {"factor": 2.0} in Python, not to InternLM2's class: the overlay must say 2.0
    transformers = pytest.importorskip("transformers")
    src = internlm2_checkpoint(tmp_path, {"type": "dynamic", "factor": 2})
    plan = launch("plan", str(src), "--factor", "2", "--trust-remote-code")
    assert plan.returncode == 0, plan.stderr
    assert "unchanged" not in plan.stdout
    for args in (("--factor", "2"), ()):  # asked for, and the config's own
        result = launch("patch", str(src), *args, "--trust-remote-code", "--out", str(tmp_path / f"out{len(args)}"))
        assert result.returncode == 0, result.stderr
        overlay = Path(result.stdout.strip().splitlines()[-1])
        written = json.loads((overlay / "config.json").read_text())["rope_scaling"]
        assert written == {"type": "dynamic", "factor": 2.0} and type(written["factor"]) is float
        config = transformers.AutoConfig.from_pretrained(str(overlay), trust_remote_code=True)
        assert type(config).__name__ == "InternLM2Config"


def phi3_checkpoint(root: Path, auto_map: bool = True) -> Path:
    """Phi-3 as published: its own configuration_phi3.py (tests/support/remote_code: the published rule)."""
    d = root / "phi3-tiny"
    d.mkdir()
    config = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "max_position_embeddings": 4096,
              "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
              "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
              "vocab_size": 1000, "torch_dtype": "bfloat16"}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config"}
        shutil.copy(REMOTE_CODE / "configuration_phi3.py", d / "configuration_phi3.py")
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


@pytest.mark.parametrize("args", [("--factor", "2"), ("--factor", "2", "--type", "linear"),
                                  ("--factor", "4", "--type", "yarn", "--force"),
                                  ("--factor", "4", "--type", "llama3", "--force")])
def test_phi3s_class_holds_none_of_the_types_launch_writes_so_each_is_one_line(launch, tmp_path, args):
    src = phi3_checkpoint(tmp_path)
    before = tree_state(tmp_path)
    out = tmp_path / "out"
    for command in ("patch", "plan"):
        for trust in (("--trust-remote-code",), ()):
            result = launch(command, str(src), *args, *trust, *(["--out", str(out)] if command == "patch" else []))
            assert_one_line_error(result, "Phi3Config", "configuration_phi3.py", "holds only longrope",
                                  "none of the types launch writes", code=2)
    assert not out.exists() and tree_state(tmp_path) == before


def internvl_qwen2_checkpoint(root: Path) -> Path:
    """InternVL whose language model is Qwen2: its own InternVLChatConfig (auto_map at the top) builds
    llm_config with transformers' Qwen2Config."""
    d = root / "internvl-qwen2"
    d.mkdir()
    config = copy.deepcopy(INTERNVL_QWEN2)
    for module in ("configuration_internvl_chat", "configuration_internlm2"):
        shutil.copy(REMOTE_CODE / f"{module}.py", d / f"{module}.py")
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def test_the_whole_configs_own_class_decides_who_reads_an_internvl_with_a_qwen2_llm(launch, tmp_path):
    src = internvl_qwen2_checkpoint(tmp_path)
    untrusted = json.loads(launch("plan", str(src), "--factor", "2", "--json").stdout)
    assert untrusted["reader"]["class"] == "Qwen2Config"  # the language model's section, whose rule applies
    assert untrusted["reader"]["outer"]["class"] == "InternVLChatConfig"
    assert untrusted["reader"]["read_through"] == "generic fallback"
    assert any("InternVLChatConfig" in w and "--trust-remote-code" in w and "generic fallback" in w
               for w in untrusted["warnings"])
    text = launch("plan", str(src), "--factor", "2").stdout
    assert "read by        lmdeploy's generic fallback: trust_remote_code is off, so InternVLChatConfig" in text
    trusted = launch("plan", str(src), "--factor", "2", "--trust-remote-code", "--json")
    data = json.loads(trusted.stdout)
    assert data["reader"]["read_through"] == "own class"
    assert not any("generic fallback" in w for w in data["warnings"])
    text = launch("plan", str(src), "--factor", "2", "--trust-remote-code").stdout
    assert ("read by        InternVLChatConfig (the model's own code, configuration_internvl_chat.py), its "
            "llm_config by Qwen2Config (transformers' own), then lmdeploy's turbomind engine") in text
