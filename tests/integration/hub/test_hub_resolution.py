"""Repo ids everywhere: `fetch`, `patch` and `plan` on an `org/name` against the tests' own hub
(tests/support/fakehub.py, a real HTTP server on 127.0.0.1), online, cached and offline, and the Hugging
Face cache byte-for-byte unchanged afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, cache_mismatches, run_launch, tree_state, user_presets
from tests.support.fakehub import TINY_CONFIG, FakeHub, tiny_repo_files

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def blobs(hf_home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (hf_home / "hub").glob("models--*/blobs/*")}


def test_done_when_fetch_patch_plan_online_then_offline(hub, tmp_path, isolated_env):
    hf_home = isolated_env / "hf"
    env = {"LAUNCH_CACHE_DIR": str(tmp_path / "launch")}

    fetched = run_launch("fetch", "org/tiny", env=env)
    assert fetched.returncode == 0, fetched.stderr
    snapshot = Path(fetched.stdout.splitlines()[-1])
    assert (snapshot / "model.safetensors").exists() and not (snapshot / "pytorch_model.bin").exists()

    hub.reset()
    again = run_launch("fetch", "org/tiny", env=env)
    assert again.returncode == 0 and Path(again.stdout.splitlines()[-1]) == snapshot
    assert hub.count() <= 1

    patched = run_launch("patch", "org/tiny", "--factor", "2", env=env)
    assert patched.returncode == 0, patched.stderr
    overlay = Path(patched.stdout.splitlines()[-1])
    config = json.loads((overlay / "config.json").read_text())
    assert config["rope_scaling"] == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}
    assert (overlay / "model.safetensors").resolve().parent.name == "blobs"

    planned = run_launch("plan", "org/tiny", "--factor", "2", "--json", env=env)
    assert planned.returncode == 0, planned.stderr
    data = json.loads(planned.stdout)
    native = json.loads((snapshot / "config.json").read_text())["max_position_embeddings"]
    assert data["session_len"] == 2 * native and data["repo_id"] == "org/tiny"
    assert data["rope_scaling"]["factor"] == 2.0

    before = blobs(hf_home)
    hub.stop()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    for argv in (["fetch", "org/tiny"], ["patch", "org/tiny", "--factor", "2"],
                 ["plan", "org/tiny", "--factor", "2", "--json"]):
        result = run_launch(*argv, env=offline, timeout=60)
        assert result.returncode == 0, (argv, result.stderr)
    assert Path(run_launch("patch", "org/tiny", "--factor", "2", env=offline).stdout.splitlines()[-1]) == overlay
    assert blobs(hf_home) == before
    with FakeHub() as again:  # the same repos served again, for huggingface_hub's own check
        again.repos = hub.repos
        assert cache_mismatches(again.url, "org/tiny") == []


def test_plan_on_a_repo_id_fetches_only_the_config(hub, isolated_env):
    result = run_launch("plan", "org/tiny", "--factor", "2", "--json")
    assert result.returncode == 0, result.stderr
    downloaded = {s.file for s in hub.requests() if s.method == "GET" and s.file}
    assert downloaded == {"config.json"}
    assert not list((isolated_env / "hf" / "hub").glob("models--org--tiny/snapshots/*/model.safetensors"))


def test_unknown_repo_is_one_line(hub):
    result = run_launch("plan", "org/missing", "--factor", "2")
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "org/missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_downloaded_preset_plans_from_its_real_config_without_a_request(hub, tmp_path, monkeypatch):
    user_presets(tmp_path, monkeypatch, tiny=(
        "name: tiny\nrepo: org/tiny\nnative_context: 256\nrope: {type: yarn, factor: 2.0}\nparameters: 1.0e6\n"
        "config: {architectures: [LlamaForCausalLM], max_position_embeddings: 256, num_hidden_layers: 2,\n"
        "         hidden_size: 64, num_attention_heads: 4, torch_dtype: float16}\n"
    ))
    before = run_launch("plan", "tiny", "--json")
    assert json.loads(before.stdout)["config_source"].startswith("preset tiny")
    assert run_launch("fetch", "tiny").returncode == 0
    hub.reset()
    after = run_launch("plan", "tiny", "--json")
    data = json.loads(after.stdout)
    assert data["config_source"].endswith("config.json") and hub.count() == 0
    assert data["max_position_embeddings"] == 2 * json.loads(
        Path(data["config_source"]).read_text())["max_position_embeddings"]


# --- cheap checks first: a refused command on a repo id asks the hub for nothing ------------------


FLAG_REFUSALS = [
    (["patch", "org/tiny", "--factor", "0"], "--factor '0': must be a number greater than 1"),
    (["patch", "org/tiny", "--factor", "1e305"], "--factor '1e305'"),
    (["patch", "org/tiny", "--type", "bogus"], "unknown RoPE type 'bogus'"),
    (["patch", "org/tiny", "--factor", "2", "--out", "FILE"], "exists and is not a directory"),
    (["patch", "org/tiny", "--factor", "2", "--out", ""], "--out ''"),
    (["patch", "org/tiny", "--factor", "2", "--out", "HF/hub/mine"], "inside the Hugging Face cache"),
    (["patch", "org/tiny", "--factor", "2", "--session-len", "0"], "--session-len"),
    (["patch", "org/tiny", "--factor", "2", "--revision", ""], "--revision"),
    (["plan", "org/tiny", "--factor", "2", "--tp", "0"], "--tp"),
    (["plan", "org/tiny", "--factor", "2", "--gpu-memory", "1e300"], "--gpu-memory"),
    (["plan", "org/tiny", "--factor", "2", "--quant-policy", "3"], "--quant-policy"),
    (["serve", "org/tiny", "--dry-run", "--factor", "0"], "--factor '0': must be a number greater than 1"),
    (["serve", "org/tiny", "--dry-run", "--factor", "2", "--cache-max-entry-count", "1"], "strictly between 0 and 1"),
    (["serve", "org/tiny", "--dry-run", "--factor", "2", "--port", "0"], "--port"),
    (["serve", "org/tiny", "--dry-run", "--factor", "2", "--health-timeout", "1e300"], "--health-timeout"),
]


@pytest.mark.parametrize("argv, needle", FLAG_REFUSALS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
@pytest.mark.parametrize("cache", ["empty", "warm"])
def test_a_refused_flag_on_a_repo_id_makes_no_request_and_leaves_the_cache_as_it_was(
        hub, tmp_path, isolated_env, argv, needle, cache):
    hf_home = isolated_env / "hf"
    env = {"LAUNCH_CACHE_DIR": str(tmp_path / "launch")}
    if cache == "warm":  # the model is cached (`plan` alone writes nothing there)
        assert run_launch("fetch", "org/tiny", "--quiet", env=env).returncode == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    before = tree_state(hf_home)
    hub.reset()
    argv = [str(blocker) if a == "FILE" else a.replace("HF/", f"{hf_home}/") for a in argv]
    result = run_launch(*argv, env=env)
    assert_one_line_error(result, needle)
    assert hub.requests() == []
    assert tree_state(hf_home) == before
    assert (before is None) == (cache == "empty")
    assert blocker.read_text() == "mine" and not (tmp_path / "launch").exists()


def test_a_bad_config_on_a_repo_id_is_refused_before_the_weights(hub, isolated_env, tmp_path):
    files = tiny_repo_files()
    files["config.json"] = b'{"architectures": [}'
    hub.add_repo("org/badcfg", files)
    result = run_launch("patch", "org/badcfg", "--factor", "2", env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(result, "is not valid config JSON")
    assert {s.file for s in hub.requests() if s.file} == {"config.json"}
    assert not list((isolated_env / "hf" / "hub").glob("models--org--badcfg/snapshots/*/model.safetensors"))
    assert not (tmp_path / "c").exists()


def test_a_refusal_from_the_config_comes_before_the_weights(hub, isolated_env, tmp_path):
    # a fine flag on its own, refused on org/tiny's config: yarn x2 over its native 256 covers 512
    result = run_launch("patch", "org/tiny", "--factor", "2", "--type", "yarn", "--session-len", "600",
                        env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(result, "--session-len 600", "512")
    assert {s.file for s in hub.requests() if s.file} == {"config.json"}
    assert not (tmp_path / "c").exists()


def test_patch_on_a_repo_id_downloads_the_commit_it_planned_with(hub, tmp_path):
    """The config is fetched alone first; the files then come from that same commit, even when the
    branch moves in between (here: before the download starts)."""
    from launcher.plan.build import PlanRequest, build_plan, with_files

    plan = build_plan(PlanRequest(model="org/tiny", factor="2", quiet=True))
    assert plan.source.path is None and plan.overlay_path is None
    planned_sha = plan.source.revision
    moved = dict(tiny_repo_files(), **{"config.json": json.dumps(dict(TINY_CONFIG, max_position_embeddings=512)).encode()})
    hub.repos["org/tiny"].push(moved)
    files, note = with_files(plan)
    assert note is None and files.source.revision == planned_sha
    assert json.loads((files.source.path / "config.json").read_text())["max_position_embeddings"] == 256
    assert files.decision is plan.decision and files.overlay_path is not None


def test_a_branch_deleted_after_planning_still_downloads_the_planned_commit(hub):
    from launcher.plan.build import PlanRequest, build_plan, with_files

    repo = hub.repos["org/tiny"]
    repo.refs["dev"] = repo.refs["main"]
    plan = build_plan(PlanRequest(model="org/tiny", factor="2", revision="dev", quiet=True))
    del repo.refs["dev"]
    files, note = with_files(plan)
    assert note is None and files.source.revision == plan.source.revision == repo.refs["main"]
    assert (files.source.path / "model.safetensors").is_file()


def test_a_repo_id_patched_online_is_then_usable_offline(hub, tmp_path, isolated_env):
    """The files come from the planned commit, and the branch asked for is recorded in the cache
    (huggingface_hub's refs/main), so the same command works offline afterwards."""
    env = {"LAUNCH_CACHE_DIR": str(tmp_path / "launch")}
    online = run_launch("patch", "org/tiny", "--factor", "2", env=env)
    assert online.returncode == 0, online.stderr
    refs = isolated_env / "hf" / "hub" / "models--org--tiny" / "refs" / "main"
    assert refs.read_text() == hub.repos["org/tiny"].refs["main"]
    hub.stop()
    offline = run_launch("patch", "org/tiny", "--factor", "2", env={**env, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.splitlines()[-1] == online.stdout.splitlines()[-1]


def test_plan_and_a_config_refusal_on_a_repo_id_write_nothing_into_the_cache(hub, tmp_path, isolated_env):
    """`plan` reads config.json alone without a trace in the HF cache, and so does a command the
    config itself refuses (a --session-len past what linear x2 covers)."""
    hf_home = isolated_env / "hf"
    env = {"LAUNCH_CACHE_DIR": str(tmp_path / "launch")}
    result = run_launch("plan", "org/tiny", "--factor", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    assert planned["session_len"] == 2 * planned["native_context"]
    assert tree_state(hf_home) is None
    assert [s.file for s in hub.requests() if s.method == "GET" and s.file] == ["config.json"]
    refused = run_launch("patch", "org/tiny", "--factor", "2", "--type", "linear", "--session-len", "4096",
                         env=env)
    assert_one_line_error(refused, "4096")
    assert tree_state(hf_home) is None
    assert not any(s.file == "model.safetensors" for s in hub.requests())
