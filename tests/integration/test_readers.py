"""`plan` and `patch` name who reads the overlay, write the shape that reader takes, and refuse before
writing anything when it would not be read as planned (issue 15), through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, tree_state

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
