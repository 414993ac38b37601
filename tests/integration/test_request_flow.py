"""A request flows once (issue 16, item 6): flags -> one typed request -> one plan -> run.

Every check a value can go through is watched while one real command runs (``sys.setprofile`` sees
each call, however the function was imported), and each call that starts a check is counted
against the flag it reads. Through the CLI each value is read once, by the parser; through code
(``PlanRequest`` / ``ServeRequest`` made with text) once, by ``check_request`` / ``check_serve``;
never again by the plan, the layouts, serve or lmdeploy's parallel check. Each replica's engine is
made once. The parser and the code path read with the same readers (``plan.request.FLAGS``), so
they refuse a hostile value in the same words.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import launcher
from launcher.app import serve as app_serve
from launcher.engine import parallel, routing, spec
from launcher.errors import LaunchError, printable
from launcher.model import overlay, presets
from launcher.plan import request as plan_request
from launcher.plan.build import build_plan
from launcher.plan.request import FLAGS, PlanRequest, check_request
from launcher.rules import checks, kvcache, rope
from launcher.runtime import address, gpu
from launcher.runtime.address import free_ports
from tests.conftest import LLAMA, free_port
from tests.unit.rules.test_limits import run  # launch ARGV in this process: (exit code, stdout, stderr)

MODEL = "internlm2_5-7b-chat"  # a preset: planned from its stored facts, nothing fetched
PACKAGE = Path(launcher.__file__).parent


def _option(frame) -> str:
    return frame.f_locals["option"]


# Every function that starts a check of a value, and the flag (or rule) it checks.
CHECKS = {
    checks.limited: _option, checks.whole: _option, checks.number: _option, checks.seconds: _option,
    checks.one_of: _option, checks.choice: _option, checks.word: _option, checks.revision: _option,
    address.check_host: _option, address.validate_host: lambda f: "--host", address.validate_port: lambda f: "--port",
    rope.parse_factor: lambda f: "--factor", rope.parse_rope_type: lambda f: "--type",
    routing.check_routing: lambda f: "--routing", plan_request.parse_dist_init_addr: lambda f: "--dist-init-addr",
    overlay.check_target: lambda f: "--out", kvcache.tp_split: lambda f: "heads / tp",
    parallel.check_parallel: lambda f: "lmdeploy's parallel rule",
}
CODES = {function.__code__: name for function, name in CHECKS.items()}
# Each engine's settings, made: EngineSpec by port (dataclasses.replace makes one too).
MADE = {spec.EngineSpec.__init__.__code__: "EngineSpec", spec.EngineSettings.__init__.__code__: "EngineSettings",
        spec.engine_config.__code__: "engine_config"}


SUPERVISOR = PACKAGE / "runtime" / "supervise.py"


@dataclasses.dataclass
class Watched:
    reads: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # flag -> checks
    where: collections.defaultdict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    made: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    supervisor: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # its own, apart


def _under_supervisor(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename == str(SUPERVISOR):
            return True
        frame = frame.f_back
    return False


@contextmanager
def watching():
    """Count, in this thread, each outermost call of a check (a check inside another is part of
    it: ``validate_host`` calling ``check_host``) by the flag it reads and the module calling it,
    and each engine spec made (by port). What the supervisor checks of the host and port it is
    handed (``runtime/supervise.py``, its owner's contract with every caller) is counted apart."""
    seen = Watched()
    depth = [0]

    def profile(frame, event, _arg):
        code = frame.f_code
        if code in CODES:
            if event == "call":
                if depth[0] == 0:
                    flag = CODES[code](frame)
                    if _under_supervisor(frame.f_back):
                        seen.supervisor[flag] += 1
                    else:
                        seen.reads[flag] += 1
                        seen.where[flag].append(Path(frame.f_back.f_code.co_filename).name)
                depth[0] += 1
            elif event == "return":
                depth[0] -= 1
        elif event == "call" and code in MADE:
            name = MADE[code]
            seen.made[f"{name} port {frame.f_locals['port']}" if name == "EngineSpec" else name] += 1

    presets.get_preset(MODEL)  # its own values were read when it loaded (cached): not this run's
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


def once_each(seen: Watched, *flags: str) -> None:
    assert {flag: seen.reads[flag] for flag in flags} == dict.fromkeys(flags, 1), seen.where
    assert all(count == 1 for count in seen.reads.values()), seen.where


# --- through the CLI: each value read once, by the parser --------------------------------------------------


PLAN = [MODEL, "--factor", "2", "--gpu-memory", "80", "--port", "9000"]


def test_plan_reads_each_flag_once():
    with watching() as seen:
        code, out, err = run(["plan", *PLAN, "--type", "dynamic", "--tp", "2", "--max-batch-size", "8",
                              "--cache-max-entry-count", "0.5", "--quant-policy", "8", "--host", "127.0.0.1",
                              "--json"])
    assert code == 0, err
    assert json.loads(out)["kv_cache"]["tp"] == 2
    once_each(seen, "--factor", "--type", "--tp", "--max-batch-size", "--cache-max-entry-count", "--quant-policy",
              "--gpu-memory", "--host", "--port", "--replicas", "--nnodes", "heads / tp")
    assert all(where == ["request.py"] for flag, where in seen.where.items() if flag.startswith("--"))
    assert seen.made == {"EngineSettings": 1, "engine_config": 1, "EngineSpec port 9000": 1}


def test_serve_dry_run_reads_each_flag_once():
    with watching() as seen:
        code, out, err = run(["serve", *PLAN, "--dry-run", "--health-timeout", "60", "--model-name", "m",
                              "--revision", "main", "--backend", "turbomind"])
    assert code == 0, err
    assert "engine call" in out
    once_each(seen, "--factor", "--gpu-memory", "--port", "--host", "--health-timeout", "--model-name", "--revision",
              "--backend", "heads / tp")
    assert seen.made == {"EngineSettings": 1, "engine_config": 1, "EngineSpec port 9000": 1}


def test_serve_replicas_dry_run_makes_each_replicas_engine_once(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with watching() as seen:
        code, out, err = run(["serve", *PLAN, "--tp", "2", "--replicas", "3", "--router", "lmdeploy", "--routing",
                              "random", "--dry-run", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert [r["port"] for r in data["replicas"]] == [9001, 9002, 9003]
    assert "server_port=9001" in data["engine_call"]  # replica 0's engine, the one the layout made
    once_each(seen, "--factor", "--tp", "--replicas", "--routing", "--port", "--host", "lmdeploy's parallel rule",
              "heads / tp")
    assert seen.made == {"EngineSettings": 1, "engine_config": 1, "EngineSpec port 9000": 1,
                         "EngineSpec port 9001": 1, "EngineSpec port 9002": 1, "EngineSpec port 9003": 1}


def test_serve_nodes_dry_run_reads_the_rendezvous_once():
    with watching() as seen:
        code, out, err = run(["serve", *PLAN, "--tp", "16", "--nnodes", "2", "--node-rank", "1",
                              "--dist-init-addr", "10.0.0.1:29500", "--dry-run", "--json"])
    assert code == 0, err
    assert [n["rank"] for n in json.loads(out)["nodes"]] == [0, 1]
    once_each(seen, "--tp", "--nnodes", "--node-rank", "--dist-init-addr", "lmdeploy's parallel rule", "heads / tp")


def test_patch_reads_each_flag_and_out_once(tiny, tmp_path):
    with watching() as seen:
        code, out, err = run(["patch", str(tiny), "--factor", "2", "--type", "linear", "--session-len", "512",
                              "--out", str(tmp_path / "ov")])
    assert code == 0, err
    assert out.strip() == str(tmp_path / "ov")
    once_each(seen, "--factor", "--type", "--session-len", "--out", "heads / tp")


# --- through code: text read once, by check_request; a checked request never again ---------------------


def test_code_gives_text_and_check_request_reads_each_value_once():
    with watching() as seen:
        plan = build_plan(PlanRequest(model=MODEL, factor="2", tp="2", port="9000", gpu_memory_gib="80",
                                      replicas="2", router="lmdeploy", routing="random"))
    assert (plan.request.factor, plan.request.tp, plan.request.port, plan.request.replicas) == (2.0, 2, 9000, 2)
    once_each(seen, "--factor", "--tp", "--port", "--gpu-memory", "--replicas", "--routing", "--host")
    assert all(where == ["request.py"] for flag, where in seen.where.items() if flag.startswith("--"))


def test_a_checked_request_is_read_by_nothing_after():
    checked = check_request(PlanRequest(model=MODEL, factor="2", gpu_memory_gib="80", nnodes="2", tp="16",
                                        dist_init_addr=" 10.0.0.1:29500"))
    assert checked.dist_init_addr == "10.0.0.1:29500" and check_request(checked) is checked
    from launcher.plan.layout import layout_for_plan

    with watching() as seen:
        plan = build_plan(checked)
        layout = layout_for_plan(plan)
    assert plan.request is checked and layout.nnodes == 2
    assert [flag for flag in seen.reads if flag.startswith("--")] == []


def test_a_changed_request_is_checked_again():
    """``dataclasses.replace`` makes a new request: what it holds was not checked, so it is."""
    checked = check_request(PlanRequest(model=MODEL, factor="2"))
    for field, value, option in [("factor", "x", "--factor"), ("tp", 0, "--tp"), ("host", "no host", "--host"),
                                 ("routing", "random", "--routing")]:
        with pytest.raises(LaunchError) as err:
            build_plan(dataclasses.replace(checked, **{field: value}))
        assert option in str(err.value)


@pytest.mark.slow  # a process starts (and exits at once)
def test_serve_through_code_reads_each_value_once_before_the_runtime(tiny, monkeypatch):
    """The whole serve path up to the server's start, through code with text values, on a
    pretended GPU (STAND-IN seam); a command that exits at once stands in for the engine."""
    monkeypatch.setattr(gpu, "nvidia_problem", lambda: None)  # STAND-IN seam: pretend a GPU
    request = app_serve.ServeRequest(plan=PlanRequest(model=str(tiny), factor="2", backend="pytorch",
                                                      port=str(free_port()), host="localhost"),
                                     health_timeout_s="10")
    with watching() as seen, pytest.raises(LaunchError):
        app_serve.serve(request, server_argv=(sys.executable, "-c", "import sys; sys.exit(3)"))
    assert seen.reads == {"--factor": 1, "--backend": 1, "--port": 1, "--host": 1, "--health-timeout": 1,
                          "--replicas": 1, "--nnodes": 1, "heads / tp": 1}, seen.where
    assert seen.where["--host"] == seen.where["--port"] == ["request.py"]


# --- one request object --------------------------------------------------------------------------------


def test_serve_request_holds_the_plan_request_and_only_what_serve_adds():
    plan_fields = {f.name for f in dataclasses.fields(PlanRequest)} - {"stage"}
    serve_fields = {f.name for f in dataclasses.fields(app_serve.ServeRequest)} - {"stage"}
    assert serve_fields & plan_fields == set()
    assert {"nnodes", "replicas", "node_rank", "dist_init_addr", "routing", "host", "port"} <= plan_fields
    assert set(FLAGS) <= plan_fields


# --- the parser and the code path read with the same readers -------------------------------------------

# flags that take text (--enable-prefix-caching is a switch: it takes none, and the parser says so)
PLAN_FLAGS = {flag.option: name for name, flag in FLAGS.items()
              if name not in ("model_name", "revision", "enable_prefix_caching")}
HOSTILE = st.one_of(
    st.sampled_from(["", " ", "x", "nan", "inf", "-1", "0", "1", "2", "1.5", "1e400", "２", "1_000", "[::1]", "a b",
                     "9" * 30, "65536", "random", "min_observed_latency", "YaRN", "ntk", "0.0.0.0", "256.1.1.1",
                     "10.0.0.1:29500", "localhost"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6),
)


@pytest.mark.slow  # 120 plans through the CLI
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(option=st.sampled_from(sorted(PLAN_FLAGS)), text=HOSTILE)
def test_a_flag_and_the_same_text_in_code_get_the_same_answer(option, text):
    """Whatever the text, ``launch plan --FLAG=TEXT`` is refused in the very line that
    ``check_request(PlanRequest(FIELD=TEXT))`` raises, or neither refuses it and both type it alike."""
    field = PLAN_FLAGS[option]
    try:
        typed, refused = getattr(check_request(PlanRequest(model=MODEL, **{field: text})), field), None
    except LaunchError as err:
        typed, refused = None, str(err)
    code, _out, err = run(["plan", MODEL, "--gpu-memory", "80", f"{option}={text}"])
    if refused is not None:
        assert (code, err) == (2, f"launch: error: {printable(refused)}\n"), (option, text)
        return
    # --cp is read alike; whether it divides the tp the plan takes (a flag's or the preset's) is the
    # plan's rule between the two, named in one line with both
    joined = option == "--cp" and err.startswith(f"launch: error: --cp '{typed}' with --tp ")
    assert joined or not err.startswith(f"launch: error: {option} "), (option, text, err)
    assert typed == FLAGS[field](text)  # the parser's reader: the same value


@pytest.mark.slow  # the real router starts
def test_serve_replicas_makes_each_replicas_engine_once_up_to_their_start(tiny, monkeypatch):
    """``serve --replicas 2`` through the CLI on a pretended GPU (STAND-IN seam), the real default
    router in front (vllm-router behind launch's front: which router does not matter here) and,
    standing in for the engines, a command that exits at once: up to their
    start, each replica's engine (its spec on its stdin) is the one its layout made."""
    monkeypatch.setattr(gpu, "nvidia_problem", lambda: None)  # STAND-IN seam: pretend a GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(app_serve, "serve", functools.partial(
        app_serve.serve, server_argv=(sys.executable, "-c", "import sys; sys.exit(3)")))  # STAND-IN engines
    port = free_ports(3)
    with watching() as seen:
        code, _out, err = run(["serve", str(tiny), "--factor", "2", "--backend", "pytorch", "--replicas", "2",
                               "--port", str(port), "--health-timeout", "120"])
    assert code == 1 and "exit" in err, err
    assert seen.made == {"EngineSettings": 1, "engine_config": 1, f"EngineSpec port {port}": 1,
                         f"EngineSpec port {port + 1}": 1, f"EngineSpec port {port + 2}": 1}
    once_each(seen, "--factor", "--backend", "--port", "--host", "--health-timeout", "--replicas", "--nnodes",
              "heads / tp")  # the ports are tried for binding (port_free), not checked again


def test_the_prefix_caching_switch_takes_no_text_and_code_gives_it_a_boolean():
    code, _out, err = run(["plan", MODEL, "--gpu-memory", "80", "--enable-prefix-caching=yes"])
    assert code == 2 and err.count("\n") == 1 and "--enable-prefix-caching" in err
    with pytest.raises(LaunchError, match="--enable-prefix-caching 'yes': is a switch"):
        check_request(PlanRequest(model=MODEL, enable_prefix_caching="yes"))
    assert check_request(PlanRequest(model=MODEL, enable_prefix_caching=True)).enable_prefix_caching is True
