"""`launch plan` and `launch patch` through the real CLI (subprocesses), good and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import LLAMA, assert_one_line_error
from tests.unit.model.test_overlay import tree_digest

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def plan_json(launch, *args, env=None):
    result = launch("plan", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_done_when_internlm_v1_factor_2(launch):
    data = plan_json(launch, "internlm-chat-7b", "--factor", "2")
    assert data["session_len"] == 4096
    assert data["native_context"] == 2048 and data["factor"] == 2.0 and data["rope_type"] == "dynamic"
    assert data["architecture"] == "LlamaForCausalLM" and data["attention_bias"] is True
    assert data["turbomind_supported"] is True
    assert data["engine"]["config"]["session_len"] == 4096
    assert data["rope_scaling"] == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}
    assert data["max_position_embeddings"] == 2048
    # 32 layers x 2 x 32 KV heads x 128 x 2 bytes
    assert data["kv_cache"]["bytes_per_token"] == 32 * 2 * 32 * 128 * 2
    assert data["kv_cache"]["bytes_per_session"] == 524288 * 4096
    assert data["engine"]["chat_template"]["eoa"] == "<eoa>"


def test_done_when_qwen_yarn_factor_4(launch):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--factor", "4", "--type", "yarn")
    assert data["max_position_embeddings"] == 131072
    assert data["rope_scaling"]["original_max_position_embeddings"] == 32768
    assert data["rope_scaling"]["factor"] == 4.0 and data["rope_scaling"]["rope_type"] == "yarn"
    assert data["session_len"] == 131072
    # 28 layers x 2 x 4 KV heads x 128 x 2 bytes = 57,344; int8: x (128 + 4); int4: (64 + 4)
    kv = data["kv_cache"]["by_quant_policy"]
    assert (kv["fp16"]["bytes_per_token"], kv["int8"]["bytes_per_token"], kv["int4"]["bytes_per_token"]) == (
        57344, 28 * 2 * 4 * 132, 28 * 2 * 4 * 68)


def test_plan_json_has_the_agreed_keys(launch):
    data = plan_json(launch, "internlm2_5-7b-chat")
    for key in ("native_context", "factor", "rope_type", "session_len", "rope_scaling", "max_position_embeddings",
                "kv_cache", "engine", "command"):
        assert key in data
    assert data["session_len"] == 65536 and data["config_unchanged"] is True
    assert data["kv_cache"]["bytes_per_token"] == 131072
    assert data["kv_cache"]["bytes_per_session"] == 8 * 1024**3
    assert data["command"][:4] == ["lmdeploy", "serve", "api_server", data["command"][3]]
    assert "--session-len" in data["command"] and "65536" in data["command"]
    assert data["engine"]["server_name"] == "127.0.0.1"


def test_plan_text_shows_diff_session_and_command(launch):
    result = launch("plan", "llama-2-7b-chat", "--factor", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '-  "rope_scaling": null' in out and '"factor": 2.0' in out
    assert "session_len    8,192 tokens" in out
    assert "lmdeploy serve api_server" in out and "--session-len 8192" in out
    assert "fp16" in out and "int8" in out and "int4" in out


def test_plan_memory_check_with_gpu_memory(launch):
    data = plan_json(launch, "internlm2_5-7b-chat", "--factor", "2", "--gpu-memory", "80")
    mem = data["memory"]
    assert mem["gpu_bytes"] == 80 * 1024**3 and mem["fits"] is True and mem["sessions_that_fit"] >= 1
    small = plan_json(launch, "internlm2_5-7b-chat-1m", "--session-len", "1048576", "--tp", "1", "--gpu-memory", "24")
    assert small["memory"]["fits"] is False
    assert any("--session-len" in a for a in small["memory"]["advice"])


def test_plan_of_a_local_directory_writes_nothing(launch, model_dir, tmp_path):
    before = tree_digest(model_dir)
    cache = tmp_path / "launch-cache"
    data = plan_json(launch, str(model_dir), "--factor", "2", env={"LAUNCH_CACHE_DIR": str(cache)})
    assert data["session_len"] == 512 and data["config_source"].endswith("config.json")
    assert data["overlay"].startswith(str(cache))
    assert not cache.exists()
    assert tree_digest(model_dir) == before


def test_patch_prints_the_overlay_path_last_and_reuses_it(launch, model_dir, tmp_path):
    before = tree_digest(model_dir)
    env = {"LAUNCH_CACHE_DIR": str(tmp_path / "c")}
    first = launch("patch", str(model_dir), "--factor", "4", "--type", "yarn", env=env)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip().splitlines()[-1])
    assert path.is_dir() and path.is_relative_to(tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    assert config["rope_scaling"]["original_max_position_embeddings"] == 256
    assert os.path.realpath(path / "model.safetensors") == str((model_dir / "model.safetensors").resolve())
    second = launch("patch", str(model_dir), "--factor", "4", "--type", "yarn", env=env)
    assert second.stdout.strip().splitlines()[-1] == str(path)
    assert "reused" in second.stderr
    assert tree_digest(model_dir) == before


def test_patch_without_type_keeps_the_existing_type(launch, model_dir, tmp_path):
    cfg = dict(LLAMA, rope_scaling={"type": "linear", "factor": 2.0})
    (model_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ov"
    result = launch("patch", str(model_dir), "--factor", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "linear"


@pytest.mark.parametrize("factor", ["0", "1", "-2", "nan", "inf", "abc"])
@pytest.mark.parametrize("command", ["plan", "patch"])
def test_bad_factors(launch, model_dir, tmp_path, factor, command):
    cache = tmp_path / "cache"
    before = tree_digest(model_dir)
    result = launch(command, str(model_dir), "--factor", factor, env={"LAUNCH_CACHE_DIR": str(cache)})
    assert_one_line_error(result, f"--factor {factor!r}: must be a number greater than 1 and at most 1024", code=2)
    assert not cache.exists() and tree_digest(model_dir) == before


def test_unknown_type(launch, model_dir):
    assert_one_line_error(launch("plan", str(model_dir), "--factor", "2", "--type", "ntk"),
                          "unknown RoPE type 'ntk'", "dynamic, linear, yarn, llama3", code=2)


def test_unknown_preset(launch):
    assert_one_line_error(launch("plan", "internlm2_5-7b"), "no preset or model directory", "internlm2_5-7b-chat")


def test_directory_without_config(launch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(launch("patch", str(empty), "--factor", "2"), "has no config.json")
    assert list(empty.iterdir()) == []


def test_missing_directory(launch, tmp_path):
    assert_one_line_error(launch("patch", str(tmp_path / "nope"), "--factor", "2"), "no such directory")


def test_malformed_config(launch, model_dir, tmp_path):
    (model_dir / "config.json").write_text('{"architectures": [}')
    cache = tmp_path / "cache"
    result = launch("patch", str(model_dir), "--factor", "2", env={"LAUNCH_CACHE_DIR": str(cache)})
    assert_one_line_error(result, "is not valid config JSON", "line 1")
    assert not cache.exists()


def test_config_without_max_position_embeddings(launch, model_dir):
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    assert_one_line_error(launch("plan", str(model_dir), "--factor", "2"), "max_position_embeddings")


def test_unwritable_overlay_location(launch, model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = tree_digest(model_dir)
    result = launch("patch", str(model_dir), "--factor", "2", env={"LAUNCH_CACHE_DIR": str(blocker / "cache")})
    assert_one_line_error(result, "cannot write the overlay", "LAUNCH_CACHE_DIR")
    assert blocker.read_text() == "x" and tree_digest(model_dir) == before


def test_invalid_preset_file(launch, tmp_path):
    user = tmp_path / "p"
    user.mkdir()
    (user / "mine.yaml").write_text("name: mine\nrepo: a/b\nbogus: 1\n")
    result = launch("plan", "mine", env={"LAUNCH_PRESETS_DIR": str(user)})
    assert_one_line_error(result, "mine.yaml", "'bogus'", "unknown field")


def test_replacing_scaling_names_the_flag(launch):
    result = launch("plan", "llama-3.1-8b-instruct", "--type", "dynamic", "--factor", "16")
    assert_one_line_error(result, "llama3 x8", "--force")


def test_bad_engine_values(launch):
    assert_one_line_error(launch("plan", "llama-2-7b-chat", "--tp", "3"), "--tp", "attention heads")
    assert_one_line_error(launch("plan", "llama-2-7b-chat", "--cache-max-entry-count", "1.5"), "strictly between 0 and 1")
    assert_one_line_error(launch("plan", "llama-2-7b-chat", "--quant-policy", "2"), "--quant-policy")
    assert_one_line_error(launch("plan", "llama-2-7b-chat", "--backend", "vllm"), "turbomind, pytorch")
    assert_one_line_error(launch("plan", "llama-2-7b-chat", "--gpu-memory", "-1"), "--gpu-memory")


def test_debug_variable_shows_the_traceback(launch):
    result = launch("plan", "llama-2-7b-chat", "--factor", "0", env={"LAUNCH_DEBUG": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr


@pytest.mark.parametrize("argv, needle", [
    (["plan"], "Missing argument"),
    (["plan", "llama-2-7b-chat", "--fcator", "2"], "--fcator"),
    (["nosuch"], "No such command"),
])
def test_parser_errors_are_one_line_too(launch, argv, needle):
    result = launch(*argv)
    assert_one_line_error(result, needle, "--help`", code=2)


@pytest.mark.parametrize("argv, needle", [
    (["plan", "llama-2-7b-chat", "--factor", "1e305"], "--factor '1e305': must be a number greater than 1 and at most"),
    (["plan", "llama-2-7b-chat", "--factor", "1025"], "--factor"),
    (["plan", "llama-2-7b-chat", "--gpu-memory", "1e300"], "--gpu-memory"),
    (["plan", "llama-2-7b-chat", "--gpu-memory", "nan"], "--gpu-memory"),
    (["plan", "llama-2-7b-chat", "--gpu-memory", "0"], "--gpu-memory"),
    (["plan", "llama-2-7b-chat", "--session-len", "2147483648"], "--session-len '2147483648'"),
    (["plan", "llama-2-7b-chat", "--session-len", "-1"], "--session-len"),
    (["plan", "llama-2-7b-chat", "--tp", "0"], "--tp"),
    (["plan", "llama-2-7b-chat", "--tp", "65"], "--tp"),
    (["serve", "llama-2-7b-chat", "--dry-run", "--tp", "abc"], "--tp 'abc': must be a whole number from 1 to 64"),
    (["plan", "llama-2-7b-chat", "--max-batch-size", "0"], "--max-batch-size"),
    (["plan", "llama-2-7b-chat", "--max-batch-size", "99999999999999999999"], "--max-batch-size"),
    (["plan", "llama-2-7b-chat", "--cache-max-entry-count", "0"], "strictly between 0 and 1"),
    (["plan", "llama-2-7b-chat", "--cache-max-entry-count", "nan"], "strictly between 0 and 1"),
    (["plan", "llama-2-7b-chat", "--quant-policy", "16"], "choose one of 0, 8, 4"),
    (["serve", "llama-2-7b-chat", "--dry-run", "--health-timeout", "1e300"], "--health-timeout"),
    (["serve", "llama-2-7b-chat", "--dry-run", "--gpu-memory", "1e300"], "--gpu-memory"),
    (["serve", "llama-2-7b-chat", "--dry-run", "--model-name", ""], "--model-name"),
    (["serve", "llama-2-7b-chat", "--dry-run", "--revision", " main"], "--revision"),
])
def test_flag_numbers_have_a_type_and_a_range(launch, tmp_path, argv, needle):
    result = launch(*argv, env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(result, needle, code=2)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("out, needle", [("", "names no new directory"), ("a\nb", "control character"), ("x" * 300, "300 bytes long")])
def test_bad_out_paths_are_refused_before_anything(launch, model_dir, tmp_path, out, needle):
    before = tree_digest(model_dir)
    result = launch("patch", str(model_dir), "--factor", "2", "--out", out, cwd=str(tmp_path))
    assert_one_line_error(result, "--out", needle, code=2)
    assert tree_digest(model_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_a_session_past_lmdeploys_int32_is_refused(launch, model_dir):
    (model_dir / "config.json").write_text(json.dumps(dict(LLAMA, max_position_embeddings=2**30)))
    assert_one_line_error(launch("plan", str(model_dir), "--factor", "4"), "past lmdeploy's limit of", "smaller --factor")
