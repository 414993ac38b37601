"""`launch k8s` through the real CLI (subprocesses): the manifests of each layout, every command in them run
back through launch's own CLI (`launch serve ... --dry-run --json` plans exactly what `launch plan` plans;
`launch proxy start` parses), bad input (one line, exit 2, nothing printed or written), `--out`, secrets
by reference only, and no heavy import."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import typer
import yaml

from launcher.cli import app
from tests.conftest import assert_one_line_error, tree_state, user_presets
from tests.integration.test_startup import HEAVY

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

IMAGE = "registry.example.com/team/launch:0.1.0"
MODEL = "internlm2_5-7b-chat"
SAMPLES = {"POD_IP": "10.1.2.3", "LWS_WORKER_INDEX": "1"}  # and LWS_LEADER_ADDRESS: the leader's, per name
LWS_VARIABLES = {"LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX"}  # LWS's webhook puts them in every container's env


def k8s(launch, *args, env=None):
    result = launch("k8s", *args, env=env)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout)), result


def containers(objects):
    """(object, container) for every container of every pod template."""
    for obj in objects:
        if obj["kind"] == "Deployment":
            yield from ((obj, c) for c in obj["spec"]["template"]["spec"]["containers"])
        elif obj["kind"] == "LeaderWorkerSet":
            for role in ("leaderTemplate", "workerTemplate"):
                yield from ((obj, c) for c in obj["spec"]["leaderWorkerTemplate"][role]["spec"]["containers"])


def substituted(container: dict, leader: str) -> list[str]:
    """The container's command as the kubelet runs it: each ``$(VAR)`` expanded (a sample value); a
    VAR is one the container declares, or one LWS's webhook declares in a LeaderWorkerSet's pods."""
    values = {**SAMPLES, "LWS_LEADER_ADDRESS": leader}
    declared = {e["name"] for e in container.get("env", [])}
    out = []
    for arg in container["command"] + container["args"]:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            assert var in declared or var in LWS_VARIABLES, f"$({var}) is declared nowhere"
            arg = arg.replace(f"$({var})", values[var])
        out.append(arg)
    return out


def parse_proxy_start(args: list[str]) -> dict:
    """`launch proxy start ARGS` parsed by launch's own CLI (every flag's reader runs), not run."""
    command = typer.main.get_command(app).commands["proxy"].commands["start"]
    return command.make_context("start", list(args)).params


LAYOUTS = {
    "one": ("--factor", "2", "--tp", "2", "--quant-policy", "8", "--port", "8080"),
    "replicas": ("--context", "64k", "--tp", "2", "--replicas", "3", "--port", "8000",
                 "--max-batch-size", "32"),
    "nodes": ("--factor", "4", "--tp", "16", "--nnodes", "2", "--cache-max-entry-count", "0.6"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_command_in_the_manifests_is_one_launch_runs_and_serves_the_plan_of_launch_plan(launch, layout):
    flags = LAYOUTS[layout]
    objects, result = k8s(launch, MODEL, *flags, "--image", IMAGE, "--gpu-memory", "80", "--name", "chat",
                          "--namespace", "ml", "--api-key-secret", "launch-keys")
    assert result.stdout.startswith("---\n")
    plan_flags = flags + (("--dist-init-addr", "chat-0.chat.ml:29500") if layout == "nodes" else ())
    planned = json.loads(launch("plan", MODEL, *plan_flags, "--gpu-memory", "80", "--json").stdout)
    seen = []
    for _, container in containers(objects):
        args = substituted(container, leader="chat-0.chat.ml")
        assert args[0] == "launch"
        if args[1:3] == ["proxy", "start"]:
            params = parse_proxy_start(args[3:])
            assert (params["host"], params["port"]) == ("0.0.0.0", 8000)
            seen.append("router")
            continue
        assert args[1:3] == ["serve", MODEL]
        served = launch(*args[1:], "--dry-run", "--json", "--gpu-memory", "80")
        assert served.returncode == 0, served.stderr
        data = json.loads(served.stdout)
        assert data["refused"] is None
        assert data["engine"]["config"] == planned["engine"]["config"]
        assert data["session_len"] == planned["session_len"]
        assert data["engine"]["config"]["tp"] == int(flags[flags.index("--tp") + 1])
        seen.append(container["name"])
    expected = {"one": ["engine"], "replicas": ["router", "engine"], "nodes": ["engine", "engine"]}
    assert seen == expected[layout]


def test_the_output_is_yaml_alone_and_the_warnings_go_to_stderr(launch):
    objects, result = k8s(launch, MODEL, "--image", IMAGE)
    assert [o["kind"] for o in objects] == ["Deployment", "Service"]
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines)
    assert any("--gpu-memory" in line for line in lines) and any("--api-key-secret" in line for line in lines)
    _, quiet = k8s(launch, MODEL, "--image", IMAGE, "--gpu-memory", "80", "--api-key-secret", "keys")
    assert quiet.stderr == ""


def test_no_key_or_token_value_reaches_a_manifest(launch):
    secrets = {"LAUNCH_API_KEYS": "sk-server-key-1,sk-server-key-2", "HF_TOKEN": "hf_TokenValue123",
               "LAUNCH_API_KEY": "sk-client-key-3"}
    for flags in ((), ("--replicas", "2"), ("--nnodes", "2", "--tp", "2")):
        objects, result = k8s(launch, MODEL, *flags, "--image", IMAGE, "--api-key-secret", "launch-keys",
                              "--hf-token-secret", "hf", "--gpu-memory", "80", env=secrets)
        for value in ("sk-server-key", "hf_TokenValue", "sk-client-key"):
            assert value not in result.stdout and value not in result.stderr
        for _, container in containers(objects):
            env = {e["name"]: e for e in container["env"]}
            assert env["LAUNCH_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "launch-keys",
                                                                          "key": "LAUNCH_API_KEYS"}
    refused = launch("k8s", MODEL, "--image", IMAGE, "--api-key", "sk-flag-key")  # k8s takes no key
    assert_one_line_error(refused, "--api-key", code=2)


BAD = [
    ((MODEL,), "--image"),
    ((MODEL, "--image", "Registry/Launch"), "lowercase"),
    ((MODEL, "--image", "launch:1@sha256:abc"), "digest"),
    ((MODEL, "--image", IMAGE, "--replicas", "0"), "--replicas"),
    ((MODEL, "--image", IMAGE, "--name", "My_Chat"), "--name 'My_Chat'"),
    ((MODEL, "--image", IMAGE, "--replicas", "2", "--name", "a" * 57), "at most 56 characters"),
    ((MODEL, "--image", IMAGE, "--namespace", "Prod"), "--namespace 'Prod'"),
    ((MODEL, "--image", IMAGE, "--cache-pvc", "hf cache"), "--cache-pvc"),
    ((MODEL, "--image", IMAGE, "--replicas", "2", "--nnodes", "2"), "--replicas"),
    (("Org/7b-model", "--image", IMAGE), "give --name NAME"),
]


@pytest.mark.parametrize(("args", "needle"), BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(launch, tmp_path, args, needle):
    out = tmp_path / "manifests"
    result = launch("k8s", *args, "--out", str(out))
    assert_one_line_error(result, needle, code=2)
    assert not out.exists()
    assert_one_line_error(launch("k8s", *args), needle, code=2)


def test_a_model_directory_is_refused(launch, tmp_path):
    from tests.conftest import LLAMA

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    result = launch("k8s", str(tmp_path), "--factor", "2", "--image", IMAGE, "--name", "tiny")
    assert_one_line_error(result, "which a pod cannot read", code=2)


@pytest.mark.parametrize("flags", [
    ("--routing", "random"),
    ("--replicas", "2", "--nnodes", "2"),
    ("--factor", "2", "--context", "64k"),
    ("--tp", "3"),
    ("--tp", "4", "--cp", "3"),
    ("--backend", "pytorch", "--nnodes", "2"),
    ("--replicas", "2", "--routing", "min_observed_latency"),
    ("--type", "ntk"),
])
def test_what_launch_plan_refuses_launch_k8s_refuses_in_the_same_words(launch, flags):
    nodes = ("--dist-init-addr", "chat-0.chat.default:29500") if "--nnodes" in flags else ()
    planned = launch("plan", MODEL, *flags, *nodes, "--gpu-memory", "80")
    made = launch("k8s", MODEL, *flags, "--image", IMAGE, "--name", "chat", "--gpu-memory", "80")
    assert planned.returncode != 0 and planned.stdout == ""
    assert_one_line_error(made, code=planned.returncode)
    assert made.stderr == planned.stderr.replace("launch plan --help", "launch k8s --help")


def test_what_serve_would_refuse_in_the_pods_is_refused_here(launch):
    """A session that does not fit the GPU given (--gpu-memory), as `serve --dry-run` refuses it."""
    flags = ("internlm2_5-7b-chat-1m", "--session-len", "1048576", "--tp", "1", "--gpu-memory", "24")
    served = launch("serve", *flags, "--dry-run")
    made = launch("k8s", *flags, "--image", IMAGE)
    assert served.returncode != 0
    assert_one_line_error(made, "not even one", code=served.returncode)
    assert made.stderr.strip() == served.stderr.strip().splitlines()[-1]
    # without --gpu-memory the pods' GPUs are unknown here: made, with a warning that the fit is unchecked
    unchecked = launch("k8s", *flags[:-2], "--image", IMAGE)
    assert unchecked.returncode == 0 and "KV-cache fit is not checked" in unchecked.stderr


def test_out_writes_one_file_per_object_into_a_new_or_empty_directory(launch, tmp_path):
    printed, _ = k8s(launch, MODEL, "--replicas", "2", "--image", IMAGE, "--gpu-memory", "80",
                     "--api-key-secret", "keys")
    out = tmp_path / "k8s"
    result = launch("k8s", MODEL, "--replicas", "2", "--image", IMAGE, "--gpu-memory", "80",
                    "--api-key-secret", "keys", "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["01-deployment-internlm2-5-7b-chat-router.yaml",
                     "02-service-internlm2-5-7b-chat-router.yaml", "03-deployment-internlm2-5-7b-chat.yaml"]
    assert result.stdout.split() == [str(out / name) for name in names]
    assert [yaml.safe_load((out / name).read_text()) for name in names] == printed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert launch("k8s", MODEL, "--image", IMAGE, "--out", str(empty)).returncode == 0
    assert len(list(empty.iterdir())) == 2
    # a directory that holds anything is refused, and left as it was
    before = tree_state(out)
    again = launch("k8s", MODEL, "--image", IMAGE, "--out", str(out))
    assert_one_line_error(again, "already holds", code=2)
    assert tree_state(out) == before


def test_a_preset_of_this_machine_is_named_as_one_the_image_must_hold(launch, tmp_path, monkeypatch):
    from launcher.model.presets import builtin_presets_dir

    text = (builtin_presets_dir() / f"{MODEL}.yaml").read_text().replace(f"name: {MODEL}\n", "name: mine\n")
    presets = user_presets(tmp_path, monkeypatch, mine=text)
    _, result = k8s(launch, "mine", "--image", IMAGE, "--gpu-memory", "80", "--api-key-secret", "k",
                    env={"LAUNCH_PRESETS_DIR": str(presets)})
    assert result.stderr.count("\n") == 1
    assert "your own preset" in result.stderr and str(presets) in result.stderr


# Imported modules, listed as the command ends. (test_startup's blocker makes them unfindable; a layout looks
# lmdeploy's parallel_config.py up by the package's location, without importing the package.)
IMPORTED = r"""
import atexit, json, sys
heavy = {heavy!r}
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in heavy)
atexit.register(lambda: print("MODULES=" + json.dumps(loaded()), file=sys.stderr))
from launcher.cli import main
main({argv!r})
"""


@pytest.mark.parametrize("argv", [
    ["k8s", "--help"],
    ["k8s", MODEL, "--image", IMAGE, "--replicas", "2", "--gpu-memory", "80", "--api-key-secret", "keys"],
    ["k8s", MODEL, "--image", IMAGE, "--nnodes", "2", "--tp", "2", "--gpu-memory", "80"],
])
def test_k8s_imports_no_heavy_module(argv):
    code = IMPORTED.format(heavy=set(HEAVY), argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.split("MODULES=")[-1]) == []
    assert result.stdout.strip()


def test_replicas_behind_the_default_router_need_a_key_secret(launch):
    """The replicas register with the router's node API from their pods' addresses: launch's front answers
    other machines only with a key, so without one every replica would fail to join, and restart forever."""
    refused = launch("k8s", MODEL, "--image", IMAGE, "--replicas", "2", "--gpu-memory", "80")
    assert_one_line_error(refused, "--api-key-secret", code=2)
    assert "--router lmdeploy" in refused.stderr and refused.stdout == ""
    objects, result = k8s(launch, MODEL, "--image", IMAGE, "--replicas", "2", "--gpu-memory", "80",
                          "--router", "lmdeploy")
    router = next(c for _, c in containers(objects) if c["name"] == "router")
    assert router["args"][-2:] == ["--router", "lmdeploy"] and "node API" in result.stderr
    objects, _ = k8s(launch, MODEL, "--image", IMAGE, "--replicas", "2", "--gpu-memory", "80",
                     "--api-key-secret", "keys")
    router = next(c for _, c in containers(objects) if c["name"] == "router")
    assert router["args"][-2:] == ["--router", "vllm"]  # the default: vllm-router behind launch's front
