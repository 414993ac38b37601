"""Issue 18 through the real CLI (subprocesses): ``--context N`` on plan, patch and serve --dry-run,
``--enable-prefix-caching``, ``--cp N``, and the one length grammar (``64k`` = 65,536) on
``--session-len`` and probe's ``--lengths``. Derivation rules: launcher/rules/context.py."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_one_line_error, run_launch
from tests.support.probe_standin import ProbeStandin
from tests.unit.model.test_overlay import tree_digest
from tests.unit.plan.test_layout import lmdeploy_serve_parser

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

K, M = 1024, 1024 * 1024


def plan_json(launch, *args, command="plan", env=None):
    result = launch(command, *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def flag_value(command: list[str], flag: str) -> str:
    """The value after ``flag`` in an argv list (the flag must be there once)."""
    assert command.count(flag) == 1, command
    return command[command.index(flag) + 1]


@pytest.fixture(scope="module")
def serve_parser():
    """lmdeploy's own ``lmdeploy serve`` parser (a fresh one, as tests/unit/plan/test_layout.py builds)."""
    return lmdeploy_serve_parser()


def lmdeploy_args(parser, command: list[str]):
    assert command[:3] == ["lmdeploy", "serve", "api_server"]
    return parser.parse_args(command[2:])


# --- --context: what is derived ------------------------------------------------------------------


def test_context_past_native_derives_the_presets_yarn(launch):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--context", "64k")
    assert data["context"] == 65536 and data["session_len"] == 65536
    assert data["native_context"] == 32768
    assert data["rope_type"] == "yarn" and data["factor"] == 2.0  # 65,536 / 32,768
    assert data["max_position_embeddings"] == 65536  # yarn: native x factor
    assert data["rope_scaling"]["original_max_position_embeddings"] == 32768
    assert data["config_unchanged"] is False and data["recipe"] is None
    assert "preset's type" in data["context_how"]
    assert data["engine"]["config"]["session_len"] == 65536
    assert flag_value(data["command"], "--session-len") == "65536"
    assert data["warnings"] == []


def test_context_within_native_writes_no_scaling(launch):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--context", "16k")
    assert data["context"] == 16384 and data["session_len"] == 16384
    assert data["config_unchanged"] is True and data["config_changes"] == []
    assert data["max_position_embeddings"] == 32768  # the shipped value
    assert "within the native 32,768" in data["context_how"]
    assert data["engine"]["config"]["session_len"] == 16384


def test_context_covered_by_the_shipped_dynamic_scaling(launch):
    data = plan_json(launch, "internlm2_5-7b-chat", "--context", "48k")
    assert data["context"] == 49152 and data["session_len"] == 49152
    assert data["rope_type"] == "dynamic" and data["factor"] == 2.0  # ships dynamic x2: 65,536 covered
    assert data["config_unchanged"] is True and data["max_position_embeddings"] == 32768
    assert "config is left as it is" in data["context_how"]
    assert data["warnings"] == []


@pytest.mark.parametrize("model, context, tokens, native, rope_type, factor", [
    ("qwen2.5-7b-instruct", "100k", 102400, 32768, "yarn", 3.125),  # 102,400 / 32,768: not rounded up to 4
    ("llama-2-7b-chat", "10k", 10240, 4096, "dynamic", 2.5),  # 10,240 / 4,096
    # internlm2_5-7b-chat ships dynamic x2 (65,536 covered). Its recipe (session 200,000) is no default: it
    # vouches for a session, it does not choose the factor (context.py, rule 2), so past 65,536 it derives.
    ("internlm2_5-7b-chat", "100k", 102400, 32768, "dynamic", 3.125),
    ("internlm2_5-7b-chat", "128k", 131072, 32768, "dynamic", 4.0),
    ("internlm2_5-7b-chat", "300k", 307200, 32768, "dynamic", 9.375),
    ("internlm2_5-7b-chat", "200001", 200001, 32768, "dynamic", 6.103546142578125),
])
def test_context_past_everything_derives_the_exact_factor(launch, model, context, tokens, native, rope_type, factor):
    data = plan_json(launch, model, "--context", context)
    assert data["native_context"] == native and factor == tokens / native
    assert data["factor"] == factor and data["rope_type"] == rope_type
    assert data["session_len"] == tokens and data["context"] == tokens
    assert data["rope_scaling"]["factor"] == factor
    assert data["config_unchanged"] is False and data["recipe"] is None
    assert data["warnings"] == []


def test_llama31_shipped_llama3_scaling_covers_64k(launch):
    data = plan_json(launch, "llama-3.1-8b-instruct", "--context", "64k")
    assert data["config_unchanged"] is True and data["config_changes"] == []
    assert data["rope_type"] == "llama3" and data["factor"] == 8.0
    assert data["max_position_embeddings"] == 131072 and data["session_len"] == 65536


# --- the 1M model's published recipe ------------------------------------------------------------


def test_1m_model_defaults_to_its_published_recipe(launch):
    data = plan_json(launch, "internlm2_5-7b-chat-1m", "--gpu-memory", "80")
    assert data["context"] is None and data["session_len"] == 1048576
    assert data["rope_type"] == "dynamic" and data["factor"] == 2.5 and data["config_unchanged"] is True
    config = data["engine"]["config"]
    assert (config["session_len"], config["tp"], config["max_batch_size"], config["cache_max_entry_count"]) == (
        1048576, 4, 1, 0.7)
    assert data["recipe"] is not None and "OpenCompass" in data["recipe"]["source"]
    defaults_from = data["engine"]["defaults_from"]
    assert defaults_from["tp"] == "recipe" and defaults_from["max_batch_size"] == "recipe"
    assert defaults_from["cache_max_entry_count"] == "recipe" and defaults_from["quant_policy"] == "preset"
    assert not [w for w in data["warnings"] if "extrapolat" in w or "recipe" in w]
    assert flag_value(data["command"], "--tp") == "4" and flag_value(data["command"], "--session-len") == "1048576"
    # InternLM2.5-7B: 32 layers, 8 KV heads over tp 4 = 2 per GPU, head_dim 128, 2 bytes:
    # 32 x 2 (K and V) x 2 x 128 x 2 = 32,768 B/token; a 1,048,576-token session is 32 GiB on each GPU
    assert data["kv_cache"]["bytes_per_token"] == 32 * 2 * 2 * 128 * 2
    assert data["kv_cache"]["bytes_per_session"] == 1048576 * 32768
    assert data["memory"]["fits"] is True


def test_1m_model_text_plan_has_no_warning(launch):
    result = launch("plan", "internlm2_5-7b-chat-1m", "--gpu-memory", "80")
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stdout and "warning:" not in result.stderr
    assert "session_len    1,048,576 tokens" in result.stdout and "OpenCompass" in result.stdout


@pytest.mark.parametrize("context", ["1m", "1M", "1048576"])
def test_1m_model_context_1m_is_the_recipe(launch, context):
    data = plan_json(launch, "internlm2_5-7b-chat-1m", "--context", context)
    assert data["context"] == 1048576 and data["session_len"] == 1048576
    assert data["rope_type"] == "dynamic" and data["factor"] == 2.5 and data["config_unchanged"] is True
    assert data["recipe"]["session_len"] == 1048576 and data["engine"]["config"]["tp"] == 4
    assert data["warnings"] == []


def test_1m_model_context_2m_derives_past_the_recipe(launch):
    data = plan_json(launch, "internlm2_5-7b-chat-1m", "--context", "2m")
    assert data["native_context"] == 262144
    assert data["rope_type"] == "dynamic" and data["factor"] == 8.0  # 2,097,152 / 262,144
    assert data["session_len"] == 2097152 and data["config_unchanged"] is False
    assert data["recipe"] is None and data["engine"]["defaults_from"]["tp"] == "preset"
    assert data["warnings"] == []


# --- a recipe that covers but is not the default ---------------------------------------------------


@pytest.mark.parametrize("model", ["internlm2-chat-7b", "internlm2_5-7b-chat"])
def test_internlm2_recipe_covers_up_to_its_session_only(launch, model):
    default = plan_json(launch, model)
    assert default["session_len"] == 65536 and default["warnings"] == []  # N x F, not the recipe's 200,000
    covered = plan_json(launch, model, "--session-len", "200000")
    assert covered["session_len"] == 200000 and covered["factor"] == 2.0 and covered["config_unchanged"] is True
    assert covered["warnings"] == []
    past = plan_json(launch, model, "--session-len", "200001")
    assert past["session_len"] == 200001 and len(past["warnings"]) == 1
    assert "no published recipe" in past["warnings"][0] and "200,001" in past["warnings"][0]


# --- the length grammar on --session-len ----------------------------------------------------------


@pytest.mark.parametrize("text, tokens", [("64k", 65536), ("64K", 65536), ("1.5k", 1536), ("65536", 65536)])
def test_session_len_takes_k_and_m(launch, text, tokens):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--session-len", text)
    assert data["session_len"] == tokens and data["engine"]["config"]["session_len"] == tokens
    assert flag_value(data["command"], "--session-len") == str(tokens)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, needles", [
    (["--context", "64k", "--factor", "2"], ["--factor", "--context"]),
    (["--context", "64k", "--session-len", "65536"], ["--session-len", "--context"]),
    (["--context", "0"], ["--context '0'", "whole number of tokens"]),
    (["--context", "abc"], ["--context 'abc'", "whole number of tokens"]),
    (["--context", "0.3k"], ["--context '0.3k'", "whole number of tokens"]),  # 307.2 tokens
    (["--context", "3g"], ["--context '3g'", "k = 1,024, m = 1,048,576"]),
    (["--context", "-64k"], ["--context '-64k'"]),
    (["--context", "2048m"], ["--context '2048m'", "2,147,483,647"]),  # 2**31: past lmdeploy's int32
])
@pytest.mark.parametrize("command", ["plan", "serve"])
def test_bad_context_is_one_line(launch, command, flags, needles):
    extra = ["--dry-run"] if command == "serve" else []
    assert_one_line_error(launch(command, "qwen2.5-7b-instruct", *extra, *flags), *needles, code=2)


def test_context_past_the_largest_factor(launch):
    # internlm-chat-7b: native 2,048; 4m / 2,048 = x2048, past launch's largest factor x1024
    assert_one_line_error(launch("plan", "internlm-chat-7b", "--context", "4m"),
                          "--context 4,194,304", "x2048", "x1024", code=2)
    assert plan_json(launch, "internlm-chat-7b", "--context", "2m")["factor"] == 1024.0  # the largest taken


def test_bad_context_on_patch_writes_nothing(launch, model_dir, tmp_path):
    cache = tmp_path / "cache"
    before = tree_digest(model_dir)
    for flags, needle in ((["--context", "abc"], "--context 'abc'"),
                          (["--context", "64k", "--factor", "2"], "--context"),
                          (["--context", "4m"], "x16384")):  # 4,194,304 / 256 native tokens
        result = launch("patch", str(model_dir), *flags, "--out", str(tmp_path / "ov"),
                        env={"LAUNCH_CACHE_DIR": str(cache)})
        assert_one_line_error(result, needle, code=2)
    assert not cache.exists() and not (tmp_path / "ov").exists()
    assert tree_digest(model_dir) == before


# --- patch and serve --dry-run -------------------------------------------------------------------


def test_patch_context_writes_the_scaling(launch, model_dir, tmp_path):
    before = tree_digest(model_dir)
    out = tmp_path / "ov"
    result = launch("patch", str(model_dir), "--context", "64k", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "config.json").read_text())
    # LLAMA's native 256, no preset, no shipped type: dynamic (launch's default) x 65,536 / 256 = 256
    assert config["rope_scaling"]["rope_type"] == "dynamic" and config["rope_scaling"]["factor"] == 256.0
    assert config["max_position_embeddings"] == 256  # dynamic keeps the native value
    record = json.loads((out / "launch-patch.json").read_text())
    assert record["rope"]["session_len"] == 65536 and record["rope"]["native_context"] == 256
    yarn = tmp_path / "yarn"
    result = launch("patch", str(model_dir), "--context", "64k", "--type", "yarn", "--out", str(yarn))
    assert result.returncode == 0, result.stderr
    config = json.loads((yarn / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 256.0
    assert config["rope_scaling"]["original_max_position_embeddings"] == 256
    assert config["max_position_embeddings"] == 65536
    assert tree_digest(model_dir) == before


def test_serve_dry_run_context(launch, serve_parser):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--dry-run", "--context", "64k", command="serve")
    assert data["context"] == 65536 and data["session_len"] == 65536
    assert data["rope_type"] == "yarn" and data["factor"] == 2.0
    assert data["engine"]["config"]["session_len"] == 65536 and "session_len=65536" in data["engine_call"]
    assert lmdeploy_args(serve_parser, data["command"]).session_len == 65536
    text = launch("serve", "qwen2.5-7b-instruct", "--dry-run", "--context", "64k")
    assert text.returncode == 0, text.stderr
    assert "session_len    65,536 tokens" in text.stdout and "context        65,536 tokens asked" in text.stdout


# --- --enable-prefix-caching ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["internlm2_5-7b-chat", "--factor", "2"],
    ["internlm2_5-7b-chat"],  # the preset's own dynamic x2, session 65,536
    ["internlm2_5-7b-chat", "--context", "128k"],
])
@pytest.mark.parametrize("command", ["plan", "serve"])
def test_prefix_caching_refused_under_dynamic_past_native(launch, command, args):
    extra = ["--dry-run"] if command == "serve" else []
    result = launch(command, *args, *extra, "--enable-prefix-caching")
    assert_one_line_error(result, "--enable-prefix-caching", "--type yarn", "32,768", code=2)


def test_prefix_caching_with_yarn(launch, serve_parser):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--type", "yarn", "--enable-prefix-caching")
    assert data["rope_type"] == "yarn" and data["session_len"] > data["native_context"]
    assert data["engine"]["config"]["enable_prefix_caching"] is True
    assert "--enable-prefix-caching" in data["command"]
    assert lmdeploy_args(serve_parser, data["command"]).enable_prefix_caching is True
    off = plan_json(launch, "qwen2.5-7b-instruct", "--type", "yarn")
    assert off["engine"]["config"]["enable_prefix_caching"] is False and "--enable-prefix-caching" not in off["command"]
    assert lmdeploy_args(serve_parser, off["command"]).enable_prefix_caching is False


def test_prefix_caching_with_dynamic_within_native(launch):
    data = plan_json(launch, "internlm2_5-7b-chat", "--context", "16k", "--enable-prefix-caching")
    assert data["session_len"] == 16384 and data["rope_type"] == "dynamic"
    assert data["engine"]["config"]["enable_prefix_caching"] is True and "--enable-prefix-caching" in data["command"]


def test_lmdeploy_parses_cp_and_prefix_caching_together(launch, serve_parser):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--type", "yarn", "--tp", "2", "--cp", "2",
                     "--enable-prefix-caching")
    args = lmdeploy_args(serve_parser, data["command"])
    assert (args.tp, args.cp, args.enable_prefix_caching) == (2, 2, True)
    assert (args.session_len, args.backend) == (data["session_len"], "turbomind")


# --- --cp -------------------------------------------------------------------------------------------


def test_cp_splits_the_kv_cache(launch, serve_parser):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--tp", "8", "--cp", "2", "--gpu-memory", "80")
    assert data["engine"]["config"]["cp"] == 2 and data["engine"]["config"]["tp"] == 8
    assert data["kv_cache"]["cp"] == 2 and data["kv_cache"]["tp"] == 8
    assert flag_value(data["command"], "--cp") == "2" and flag_value(data["command"], "--tp") == "8"
    assert lmdeploy_args(serve_parser, data["command"]).cp == 2
    # Qwen2.5-7B: 28 layers, 4 KV heads, head_dim 128, fp16 (2 bytes). Attention TP = tp / cp = 8 / 2 = 4,
    # so each GPU holds 4 / 4 = 1 KV head: 28 x 2 (K and V) x 1 x 128 x 2 = 14,336 B/token.
    per_token = 28 * 2 * 1 * 128 * 2
    assert data["kv_cache"]["bytes_per_token"] == per_token == 14336
    # The session (131,072: the preset's yarn x4) is split over the cp = 2 ranks: 65,536 tokens per GPU.
    assert data["session_len"] == 131072
    assert data["kv_cache"]["bytes_per_session"] == (131072 // 2) * per_token == 939524096
    assert data["memory"]["bytes_per_session"] == 939524096


@pytest.mark.parametrize("flags, needles", [
    (["--tp", "6", "--cp", "4"], ["--cp '4'", "--tp 6", "multiple of cp"]),
    (["--cp", "3", "--tp", "6"], ["--cp '3'", "2, 4, 8"]),
    (["--cp", "2", "--tp", "2", "--backend", "pytorch"], ["--cp '2'", "--backend turbomind"]),
    (["--cp", "0"], ["--cp '0'"]),
])
def test_bad_cp_is_one_line(launch, flags, needles):
    assert_one_line_error(launch("plan", "qwen2.5-7b-instruct", *flags), *needles, code=2)


def test_cp_with_replicas(launch):
    data = plan_json(launch, "qwen2.5-7b-instruct", "--tp", "2", "--cp", "2", "--replicas", "2")
    replicas = [c for c in data["commands"] if c["role"] == "replica"]
    assert len(replicas) == 2 and len(data["replicas"]) == 2
    assert [r["env"]["CUDA_VISIBLE_DEVICES"] for r in replicas] == ["0,1", "2,3"]
    for replica in replicas:
        assert flag_value(replica["command"], "--cp") == "2" and flag_value(replica["command"], "--tp") == "2"
    assert [c["role"] for c in data["commands"]].count("proxy") == 1


# --- probe's --lengths takes the same grammar --------------------------------------------------------


def test_probe_lengths_take_k(tmp_path, monkeypatch):
    monkeypatch.delenv("LAUNCH_API_KEY", raising=False)
    out = tmp_path / "probe"
    with ProbeStandin(visible=100_000, session_len=100_000) as server:
        proc = run_launch("probe", "--url", server.url, "--lengths", "8k,0.5k,1x", "--native", "4k",
                          "--depths", "0", "--trials", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["native_context"] == 4096
    assert sorted(settings["lengths"]) == [512, 4096, 8192]
