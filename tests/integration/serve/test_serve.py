"""`launch serve` on a CPU machine: the exact engine config and server arguments (real lmdeploy
classes and parser), the checks that stop it before anything slow, and the whole serve path against
a stand-in for the GPU engine (tests/support/standin_engine_server.py)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from launcher.engine.spec import backend_config, chat_template_config, serve_kwargs, spec_to_json
from launcher.model.presets import get_preset
from launcher.model.source import from_dir
from launcher.plan.build import PlanRequest, build_plan, make_overlay
from launcher.runtime.process import SPEC_ON_STDIN
from tests.conftest import REPO, assert_one_line_error, free_port, run_launch, user_presets
from tests.support.standin_engine_server import key_digest, spec_seen

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def lmdeploy_parser():
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.serve import SubCliServe

    if not getattr(lmdeploy_parser, "done", False):
        SubCliServe.add_parsers()
        lmdeploy_parser.done = True
    return CLI.parser


# --- the exact engine call ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, args, expected",
    [
        ("internlm2_5-7b-chat", {"factor": "2"},
         {"session_len": 65536, "tp": 1, "max_batch_size": 64, "cache_max_entry_count": 0.8, "quant_policy": 0}),
        ("internlm2_5-7b-chat-1m", {},  # the published 1M recipe
         {"session_len": 1048576, "tp": 4, "max_batch_size": 1, "cache_max_entry_count": 0.7, "quant_policy": 0}),
        ("qwen2.5-7b-instruct", {"context": "64k", "tp": "8", "cp": "2", "enable_prefix_caching": True},
         {"session_len": 65536, "tp": 8, "cp": 2, "enable_prefix_caching": True}),
        ("qwen2.5-7b-instruct", {"factor": "4", "rope_type": "yarn", "tp": 2, "quant_policy": 8},
         {"session_len": 131072, "tp": 2, "max_batch_size": 64, "cache_max_entry_count": 0.8, "quant_policy": 8}),
        ("internlm-chat-7b", {"factor": "2", "cache_max_entry_count": 0.5, "max_batch_size": 8},
         {"session_len": 4096, "tp": 1, "max_batch_size": 8, "cache_max_entry_count": 0.5, "quant_policy": 0}),
    ],
)
def test_turbomind_engine_config_with_the_real_class(preset, args, expected):
    from lmdeploy.messages import TurbomindEngineConfig

    plan = build_plan(PlanRequest(model=preset, **args))
    spec = spec_to_json(plan.engine, "/models/overlay")
    config = backend_config(spec)
    assert type(config) is TurbomindEngineConfig
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert config.rope_scaling_factor == 0.0  # ignored by lmdeploy >= 0.14: launch never relies on it


def test_pytorch_engine_config_for_mistral():
    from lmdeploy.messages import PytorchEngineConfig

    plan = build_plan(PlanRequest(model="mistral-7b-instruct-v0.2", factor="2"))
    config = backend_config(spec_to_json(plan.engine, "/m"))
    assert type(config) is PytorchEngineConfig
    assert (config.session_len, config.tp, config.max_batch_size) == (65536, 1, 64)
    # within the native 32k, dynamic never rescales: prefix caching is taken, and no cp reaches the class
    plan = build_plan(PlanRequest(model="mistral-7b-instruct-v0.2", context="16k", enable_prefix_caching=True))
    config = backend_config(spec_to_json(plan.engine, "/m"))
    assert (config.session_len, config.enable_prefix_caching) == (16384, True)
    assert "cp" not in spec_to_json(plan.engine, "/m")["engine_config"]


def test_lmdeploys_own_parser_reads_cp_and_prefix_caching():
    plan = build_plan(PlanRequest(model="qwen2.5-7b-instruct", rope_type="yarn", tp="8", cp="2",
                                  enable_prefix_caching=True))
    args = lmdeploy_parser().parse_args(plan.command[1:])
    assert (args.cp, args.enable_prefix_caching, args.tp) == (2, True, 8)
    plain = lmdeploy_parser().parse_args(build_plan(PlanRequest(model="qwen2.5-7b-instruct")).command[1:])
    assert (plain.cp, plain.enable_prefix_caching) == (1, False)


def test_serve_kwargs_bind_to_lmdeploys_serve_and_keys_are_a_list(tmp_path):
    from lmdeploy.model import ChatTemplateConfig
    from lmdeploy.serve.openai.api_server import serve

    src = tmp_path / "v1"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(get_preset("internlm-chat-7b").stub_config()))
    plan = build_plan(PlanRequest(model="internlm-chat-7b", factor="2"), source=from_dir(src, preset=get_preset("internlm-chat-7b")))
    overlay = make_overlay(plan)
    spec = spec_to_json(plan.engine, str(overlay.path))
    spec["api_keys"] = ["sk-one", "sk-two"]
    kwargs = serve_kwargs(spec)
    inspect.signature(serve).bind(**kwargs)  # raises TypeError on a wrong name
    assert kwargs["api_keys"] == ["sk-one", "sk-two"] and isinstance(kwargs["api_keys"], list)
    assert kwargs["backend"] == "turbomind" and kwargs["server_name"] == "127.0.0.1"
    assert kwargs["server_port"] == 23333 and kwargs["trust_remote_code"] is True
    template = kwargs["chat_template_config"]
    assert isinstance(template, ChatTemplateConfig)
    prompt = template.chat_template().messages2prompt([{"role": "user", "content": "hi"}])
    assert "<|User|>:hi\n" in prompt and prompt.rstrip().endswith("<|Bot|>:")
    assert "Shanghai AI Laboratory" in prompt
    assert serve_kwargs({**spec, "api_keys": []})["api_keys"] is None
    assert chat_template_config({**spec, "chat_template": None}) is None


@pytest.mark.parametrize("preset", ["internlm-chat-7b", "internlm2_5-7b-chat", "qwen2.5-7b-instruct",
                                    "llama-3.1-8b-instruct", "mistral-7b-instruct-v0.2"])
def test_lmdeploys_own_parser_accepts_the_command(preset):
    plan = build_plan(PlanRequest(model=preset))
    args = lmdeploy_parser().parse_args(plan.command[1:])
    cfg = plan.engine.config
    assert args.model_path == plan.command[3]
    assert args.backend == plan.engine.backend
    assert (args.session_len, args.tp, args.max_batch_size) == (cfg.session_len, cfg.tp, cfg.max_batch_size)
    assert args.cache_max_entry_count == cfg.cache_max_entry_count and args.quant_policy == cfg.quant_policy
    assert args.server_name == "127.0.0.1" and args.server_port == 23333
    assert args.model_name == preset
    assert args.trust_remote_code == plan.source.trust_remote_code
    if plan.engine.chat_template:  # a file in the overlay (lmdeploy can't take a long one inline)
        assert args.chat_template == os.path.join(plan.command[3], "launch-chat-template.json")


def test_done_when_dry_run_prints_the_plan_and_a_command_lmdeploy_parses(launch):
    result = launch("serve", "internlm2_5-7b-chat", "--factor", "2", "--dry-run", "--gpu-memory", "80", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["engine"]["config"]["session_len"] == 65536
    assert data["memory"]["fits"] is True
    assert "TurbomindEngineConfig(" in data["engine_call"] and "session_len=65536" in data["engine_call"]
    args = lmdeploy_parser().parse_args(data["command"][1:])
    assert args.session_len == 65536 and args.backend == "turbomind"
    text = launch("serve", "internlm2_5-7b-chat", "--factor", "2", "--dry-run", "--gpu-memory", "80")
    assert "session_len    65,536 tokens" in text.stdout and "engine call" in text.stdout


# --- checks before anything slow -----------------------------------------------------------------

# STAND-IN seam: this machine has no GPU, so serve's first check (launcher.runtime.gpu.nvidia_problem) would
# refuse; the checks after it, and the stand-in engine below, are reached by telling it one exists.
PRETEND_GPU = "import launcher.runtime.gpu\nlauncher.runtime.gpu.nvidia_problem = lambda: None\n"


def launch_with_gpu(*args: str, env: dict | None = None):
    """``launch ARGS`` in a fresh interpreter, as the ``launch`` fixture, on a pretended GPU."""
    code = PRETEND_GPU + "import sys\nfrom launcher.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO, check=False)



def test_without_turbomind_serve_stops_before_downloading(tmp_path):
    hf = tmp_path / "hf"
    dead = f"http://127.0.0.1:{free_port()}"
    result = launch_with_gpu("serve", "internlm2_5-7b-chat", "--factor", "2", "--gpu-memory", "80",
                    env={"HF_HOME": str(hf), "HF_ENDPOINT": dead, "LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(result, "turbomind engine cannot serve this", "--backend pytorch")
    assert not hf.exists() and not (tmp_path / "c").exists()


def test_architecture_turbomind_lacks_is_refused_naming_pytorch():
    result = launch_with_gpu("serve", "mistral-7b-instruct-v0.2", "--backend", "turbomind", "--gpu-memory", "80")
    assert_one_line_error(result, "does not support the MistralForCausalLM architecture", "--backend pytorch")


def test_no_session_fits_stops_with_advice(tmp_path):
    result = launch_with_gpu("serve", "internlm2_5-7b-chat-1m", "--session-len", "1048576", "--tp", "1",
                    "--gpu-memory", "40", env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(result, "not even one 1048576-token session fits", "128.00 GiB", "--session-len", "--tp 8")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--health-timeout", "nan"], "--health-timeout"), (["--health-timeout", "-5"], "--health-timeout"),
    (["--port", "0"], "--port"), (["--port", "http"], "--port"), (["--host", " "], "--host"),
    (["--api-key", "has space"], "API key"), (["--api-key-file", "/nonexistent/keys"], "/nonexistent/keys"),
])
def test_bad_serve_flags(launch, flags, needle, tmp_path):
    result = launch("serve", "internlm2_5-7b-chat", "--dry-run", *flags, env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(result, needle, code=2)
    assert not (tmp_path / "c").exists()


# --- the whole path against a stand-in engine ------------------------------------------------------

DRIVER = PRETEND_GPU + r"""
import sys
from pathlib import Path
from launcher.errors import LaunchError
from launcher.plan.build import PlanRequest
from launcher.app.serve import ServeRequest, serve
model, port, probe = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "probe"
request = ServeRequest(
    plan=PlanRequest(model=model, factor="2", backend="pytorch", port=port),
    api_keys=("sk-flag",), probe=probe, health_timeout_s=60,
)
try:
    code = serve(request, server_argv=(sys.executable, str(Path("tests/support/standin_engine_server.py").resolve())))
except LaunchError as err:
    print(f"launch: error: {err}", file=sys.stderr)
    code = 1
sys.exit(code)
"""


def start_driver(model_dir, port, tmp_path, probe=False, env=None):
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp_path / "cache"), LAUNCH_API_KEYS="sk-env",
               PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(model_dir), str(port), "probe" if probe else "-"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc, needle, timeout=60):
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {needle!r} in stdout:\n{''.join(lines)}\nstderr:\n{proc.stderr.read()}")


def get(url, key=None, data=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(data).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_serve_end_to_end_with_a_standin_engine(model_dir, tmp_path):
    port = free_port()
    proc = start_driver(model_dir, port, tmp_path)
    try:
        ready = "".join(read_until(proc, "curl"))
        assert f"http://127.0.0.1:{port}/v1" in ready and "tiny" in ready
        root = f"http://127.0.0.1:{port}"
        assert get(root + "/v1/models")[0] == 401
        status, body = get(root + "/v1/models", key="sk-flag")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
        assert get(root + "/v1/models", key="sk-env")[0] == 200
        assert get(root + "/v1/models", key="s")[0] == 401  # keys were handed over as a list
        status, body = get(root + "/v1/chat/completions", key="sk-flag",
                           data={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        assert get(root + "/metrics", key="sk-flag")[0] == 200
        # what the serving process was given
        spec = spec_seen(next((tmp_path / "cache" / "runs").glob("*/server.log")))
        assert spec["api_keys"] == [key_digest("sk-flag"), key_digest("sk-env")]
        assert spec["server_name"] == "127.0.0.1"
        assert not keys_on_disk(tmp_path / "cache", "sk-flag", "sk-env")  # the spec came through a pipe
        assert spec["engine_config"]["session_len"] == 512
        overlay = Path(spec["model_path"])
        assert json.loads((overlay / "config.json").read_text())["rope_scaling"]["factor"] == 2.0
        assert json.loads((model_dir / "config.json").read_text())["rope_scaling"] is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not keys_on_disk(tmp_path / "cache", "sk-flag", "sk-env")


def keys_on_disk(root: Path, *keys: str) -> list[Path]:
    """Files under ``root`` that hold one of ``keys``."""
    return [p for p in root.rglob("*") if p.is_file() and any(k.encode() in p.read_bytes() for k in keys)]


def test_serve_probe_prints_the_table_before_handing_over(model_dir, tmp_path):
    port = free_port()
    proc = start_driver(model_dir, port, tmp_path, probe=True)
    try:
        out = "".join(read_until(proc, "heatmap.png", timeout=120))
        assert "overall accuracy 1.00" in out
        table = out[out.index("depth"):]
        header = table.splitlines()[0].split()
        # 0.5x and 1x of 256; 1.5x and 2x capped so prompt + answer + template fit session_len 512
        assert header[1:4] == ["128", "256", "320"]
        results = next((tmp_path / "cache" / "runs").glob("*/probe-*/results.json"))
        assert json.loads(results.read_text())["trials"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


# --- the plan is made once ---------------------------------------------------------------------


def serve_until_ready(model, tmp_path, env=None):
    """Serve ``model`` (factor 2, PyTorch backend) with the stand-in engine until ready, stop it with
    Ctrl-C; returns (stderr, the spec the serving process was given)."""
    proc = start_driver(model, free_port(), tmp_path, env=env)
    try:
        read_until(proc, "curl")
        spec = spec_seen(next((tmp_path / "cache" / "runs").glob("*/server.log")))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    return err, spec


def test_serve_on_a_repo_id_plans_once_from_the_config_alone(hub, tmp_path):
    """The config is fetched alone and planned with; the download is of that same commit, so the
    downloaded config is the planned one and nothing is planned again."""
    err, spec = serve_until_ready("org/tiny", tmp_path)
    assert "re-planned" not in err
    assert spec["engine_config"]["session_len"] == 512 and spec["model_name"] == "tiny"
    config_gets = [s for s in hub.requests() if s.method == "GET" and s.file == "config.json"]
    # read alone first (into memory: the cache stays untouched until every check passed), then once
    # more by the download of that same commit, which is what writes it into the cache
    assert len(config_gets) == 2
    first_weight = next(i for i, s in enumerate(hub.requests()) if s.file == "model.safetensors")
    assert hub.requests().index(config_gets[0]) < first_weight


def test_serve_replans_only_when_the_downloaded_config_differs(hub, tmp_path, monkeypatch):
    """A preset planned from its cached snapshot; the branch moved on the hub since (a new config
    with twice the context): serve downloads the new commit, says it re-planned, and serves the
    new plan."""
    user_presets(tmp_path, monkeypatch, tiny=(
        "name: tiny\nrepo: org/tiny\nnative_context: 256\nrope: {type: dynamic, factor: 2.0}\nparameters: 1.0e6\n"
        "config: {architectures: [LlamaForCausalLM], max_position_embeddings: 256, num_hidden_layers: 1,\n"
        "         hidden_size: 16, num_attention_heads: 2, num_key_value_heads: 1, torch_dtype: float32}\n"
    ))
    assert run_launch("fetch", "tiny").returncode == 0
    err, spec = serve_until_ready("tiny", tmp_path / "same")
    assert "re-planned" not in err and spec["engine_config"]["session_len"] == 512

    from tests.support.fakehub import TINY_CONFIG, tiny_repo_files

    longer = dict(TINY_CONFIG, max_position_embeddings=512)
    hub.repos["org/tiny"].push(dict(tiny_repo_files(), **{"config.json": json.dumps(longer).encode()}))
    err, spec = serve_until_ready("tiny", tmp_path / "moved")
    notes = [line for line in err.splitlines() if "re-planned" in line]
    assert len(notes) == 1 and "session_len 512 -> 1024" in notes[0], err
    assert spec["engine_config"]["session_len"] == 1024
    assert json.loads((Path(spec["model_path"]) / "config.json").read_text())["max_position_embeddings"] == 512


def test_a_planned_local_directory_is_not_planned_again(model_dir, monkeypatch):
    import launcher.plan.build as plan_module

    plan = build_plan(PlanRequest(model=str(model_dir), factor="2"))
    calls = []
    monkeypatch.setattr(plan_module, "build_plan", lambda *a, **k: calls.append(a))
    same, note = plan_module.with_files(plan)
    assert same is plan and note is None and calls == []


def test_busy_port_is_an_error_before_the_overlay(model_dir, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = start_driver(model_dir, port, tmp_path)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"{port}" in err and "--port" in err
    assert not (tmp_path / "cache" / "overlays").exists()


def test_tp_beyond_the_gpus_present_stops_before_downloading():
    from dataclasses import replace

    from launcher.app.serve import _check_gpus
    from launcher.rules.checks import BadOption

    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat-1m"))  # its preset: tp 4
    assert plan.engine.config.tp == 4
    _check_gpus(replace(plan, gpu_count=4))
    _check_gpus(replace(plan, gpu_count=None))  # unknown here: lmdeploy will say
    with pytest.raises(BadOption) as err:
        _check_gpus(replace(plan, gpu_count=1))
    assert "--tp" in str(err.value) and "has 1 as CUDA sees them" in str(err.value)


def test_run_files_stay_in_launchs_cache_whatever_the_model_name(tmp_path, monkeypatch):
    from dataclasses import replace

    from launcher.app.serve import _spec

    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    plan = build_plan(PlanRequest(model="llama-2-7b-chat", model_name="../../escape"))
    plan = replace(plan, engine=replace(plan.engine, api_keys=("sk",)))
    spec, log = _spec(plan, tmp_path / "overlay")
    assert log.parent.parent == tmp_path / "cache" / "runs" and log.name == "server.log"
    assert json.loads(spec)["model_name"] == "../../escape"  # the served name is kept
    assert not (tmp_path / "cache").exists()  # the spec is handed over, not written


def test_the_real_serving_process_refuses_without_turbomind(tmp_path):
    """launcher.engine.server itself (no stand-in): on a machine without CUDA it stops with exit 3
    and names --backend pytorch, before lmdeploy's server is started."""
    from launcher.engine.spec import turbomind_problem

    if turbomind_problem() is None:
        pytest.skip("TurboMind works here")
    plan = build_plan(PlanRequest(model="llama-2-7b-chat"))
    result = subprocess.run([sys.executable, "-m", "launcher.engine.server", SPEC_ON_STDIN], cwd=REPO,
                            input=json.dumps(spec_to_json(plan.engine, str(tmp_path))),  # as serve hands it over
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 3
    assert "TurboMind" in result.stderr and "--backend pytorch" in result.stderr
