"""Repo ids everywhere: `fetch`, `patch` and `plan` on an `org/name` against the tests' own hub
(tests/fakehub.py, a real HTTP server on 127.0.0.1), online, cached and offline, and the Hugging
Face cache byte-for-byte unchanged afterwards."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.hub import verify_cache
from tests.conftest import run_launch


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
    assert verify_cache("org/tiny") == []


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
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny.yaml").write_text(
        "name: tiny\nrepo: org/tiny\nnative_context: 256\nrope: {type: yarn, factor: 2.0}\nparameters: 1.0e6\n"
        "config: {architectures: [LlamaForCausalLM], max_position_embeddings: 256, num_hidden_layers: 2,\n"
        "         hidden_size: 64, num_attention_heads: 4, torch_dtype: float16}\n"
    )
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(presets))
    before = run_launch("plan", "tiny", "--json")
    assert json.loads(before.stdout)["config_source"].startswith("preset tiny")
    assert run_launch("fetch", "tiny").returncode == 0
    hub.reset()
    after = run_launch("plan", "tiny", "--json")
    data = json.loads(after.stdout)
    assert data["config_source"].endswith("config.json") and hub.count() == 0
    assert data["max_position_embeddings"] == 2 * json.loads(
        Path(data["config_source"]).read_text())["max_position_embeddings"]
