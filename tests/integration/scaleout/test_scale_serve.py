"""Scale-out through the real CLI: `launch plan --replicas / --nnodes` (layouts checked with
lmdeploy's own function, commands parsed by lmdeploy's own parser), `launch serve --proxy-url`
(a replica that registers itself after its /health and leaves on stop) and `launch serve
--replicas 2 --router lmdeploy` (the REAL lmdeploy proxy in front of two STAND-IN engines,
tests/support/standin_engine_server.py: the GPU engine cannot run here). What is lmdeploy's proxy's (its
command in the plan, its routing, its watchdog, its open node API) is asked for with --router lmdeploy;
the default router (vllm-router behind launch's front) has tests/integration/scaleout/test_router.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher.net import http
from launcher.runtime.address import free_ports
from launcher.runtime.process import group_members
from launcher.scaleout.nodes import proxy_nodes
from tests.conftest import REPO, assert_one_line_error, free_port, killed_if_running, run_launch
from tests.integration.scaleout.test_proxy import children_of, start_launch_proxy, stop, wait_for
from tests.integration.serve.test_serve import PRETEND_GPU, launch_with_gpu, read_until
from tests.support.standin_engine_server import key_digest, spec_seen
from tests.unit.plan.test_layout import lmdeploy_serve_parser, parse

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


@pytest.fixture(scope="module")
def serve_parser():
    return lmdeploy_serve_parser()


# --- launch plan --replicas / --nnodes ----------------------------------------------------------


def test_done_when_plan_four_replicas_on_disjoint_gpu_pairs(launch, serve_parser, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # unset: no GPU seen here, ids assumed
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "4", "--tp", "2", "--replicas", "4",
                    "--router", "lmdeploy", "--gpu-memory", "80", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    replicas = data["replicas"]
    assert len(replicas) == 4
    gpu_sets = [tuple(r["gpus"]) for r in replicas]
    assert all(len(g) == 2 for g in gpu_sets)
    assert len({gpu for g in gpu_sets for gpu in g}) == 8  # disjoint pairs
    ports = [r["port"] for r in replicas]
    assert ports == [23334, 23335, 23336, 23337] and data["proxy"]["port"] == 23333
    for r in replicas:
        assert r["session_len"] == 131072
        args = parse(serve_parser, r["command"])
        assert (args.session_len, args.tp, args.server_name, args.server_port) == (131072, 2, "127.0.0.1", r["port"])
        assert r["env"] == {"CUDA_VISIBLE_DEVICES": ",".join(r["gpus"])}
    proxy_args = parse(serve_parser, data["proxy"]["command"])
    assert (proxy_args.server_name, proxy_args.server_port) == ("127.0.0.1", 23333)
    per = data["memory"]["sessions_that_fit"]
    assert per >= 1 and data["capacity"]["sessions"] == 4 * per == 4 * data["capacity"]["sessions_per_replica"]
    assert data["capacity"]["gpu_ids_assumed"] is True
    # what serve runs, in order: the proxy, then each replica; no single api_server command on the
    # proxy's port pretending to be it
    assert data["command"] is None and data["command_line"] is None
    commands = data["commands"]
    assert [(c["role"], c.get("index")) for c in commands] == [("proxy", None)] + [("replica", i) for i in range(4)]
    assert commands[0]["command"] == data["proxy"]["command"] and commands[0]["env"] == {}
    for entry, replica in zip(commands[1:], replicas):
        assert (entry["command"], entry["env"]) == (replica["command"], replica["env"])
        assert entry["command_line"] == replica["command_line"]
    listening = [parse(serve_parser, c["command"]).server_port for c in commands]
    assert listening == [23333, 23334, 23335, 23336, 23337]  # each process its own port


def test_plan_capacity_is_capped_at_max_batch_size_and_says_so(launch):
    args = ("plan", "internlm2_5-7b-chat", "--factor", "1.5", "--tp", "2", "--gpu-memory", "80")
    base = json.loads(launch(*args, "--replicas", "2", "--json").stdout)
    held = base["memory"]["sessions_that_fit"]
    assert held > 8 and base["capacity"]["limit"] == "memory"  # max_batch_size 64 by default
    data = json.loads(launch(*args, "--replicas", "2", "--max-batch-size", "8", "--json").stdout)
    assert data["memory"]["sessions_that_fit"] == held  # the KV cache holds as many as before...
    assert (data["capacity"]["sessions"], data["capacity"]["sessions_per_replica"], data["capacity"]["limit"],
            data["capacity"]["sessions_by_memory"]) == (16, 8, "max_batch_size", held)  # ...but 8 run at once
    text = launch(*args, "--replicas", "2", "--max-batch-size", "8").stdout
    assert (f"capacity       16 full-length session(s) at once (8 per replica; limited by max_batch_size 8: the KV "
            f"cache would hold {held} per replica") in text
    one = launch(*args, "--max-batch-size", "8")
    assert "capacity       8 full-length session(s) at once (limited by max_batch_size 8" in one.stdout
    single = json.loads(launch(*args, "--max-batch-size", "8", "--json").stdout)["capacity"]
    assert (single["sessions"], single["limit"]) == (8, "max_batch_size")


def test_plan_routing_is_the_proxys(launch, serve_parser):
    args = ("plan", "internlm2_5-7b-chat", "--factor", "2", "--replicas", "2", "--router", "lmdeploy",
            "--gpu-memory", "80")
    default = json.loads(launch(*args, "--json").stdout)
    chosen = json.loads(launch(*args, "--routing", "random", "--json").stdout)
    assert (default["proxy"]["routing"], chosen["proxy"]["routing"]) == ("min_expected_latency", "random")
    assert parse(serve_parser, default["commands"][0]["command"]).routing_strategy == "min_expected_latency"
    assert parse(serve_parser, chosen["commands"][0]["command"]).routing_strategy == "random"
    text = launch(*args, "--routing", "random").stdout
    assert "replicas on loopback; routing random)" in text and "--routing-strategy random" in text


def test_plan_without_a_layout_lists_its_one_server_command(launch, serve_parser):
    data = json.loads(launch("plan", "internlm2_5-7b-chat", "--factor", "2", "--json").stdout)
    assert data["commands"] == [{"role": "server", "env": {}, "command": data["command"],
                                 "command_line": data["command_line"]}]
    assert parse(serve_parser, data["command"]).server_port == 23333


def test_plan_replicas_take_the_visible_gpus_and_text_shows_the_layout(launch):
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "4", "--tp", "2", "--replicas", "2",
                    "--router", "lmdeploy", "--gpu-memory", "80", "--port", "9000",
                    env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert result.returncode == 0, result.stderr
    assert "CUDA_VISIBLE_DEVICES=4,5 lmdeploy serve api_server" in result.stdout
    assert "CUDA_VISIBLE_DEVICES=6,7 lmdeploy serve api_server" in result.stdout
    assert "http://127.0.0.1:9001" in result.stdout and "http://127.0.0.1:9002" in result.stdout
    assert "lmdeploy serve proxy --server-name 127.0.0.1 --server-port 9000" in result.stdout
    assert "full-length session(s) at once" in result.stdout
    # every api_server line is a replica's (on its own port), none on the proxy's port 9000
    servers = [line for line in result.stdout.splitlines() if "lmdeploy serve api_server" in line]
    assert len(servers) == 2 and all(line.lstrip().startswith("CUDA_VISIBLE_DEVICES=") for line in servers)
    assert "--server-port 9000" not in "".join(servers)
    assert "commands       serve runs lmdeploy's proxy on 127.0.0.1:9000 and 2 replica(s)" in result.stdout


def test_done_when_plan_tp16_over_two_nodes(launch, serve_parser):
    args = ("plan", "internlm2_5-7b-chat", "--factor", "4", "--tp", "16", "--nnodes", "2",
            "--dist-init-addr", "10.0.0.1:29500", "--gpu-memory", "80")
    result = launch(*args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    nodes = data["nodes"]
    assert [n["rank"] for n in nodes] == [0, 1] and [n["serves_http"] for n in nodes] == [True, False]
    for node in nodes:
        parsed = parse(serve_parser, node["command"])
        assert (parsed.tp, parsed.nnodes, parsed.node_rank, parsed.dist_init_addr) == (16, 2, node["rank"],
                                                                                     "10.0.0.1:29500")
        assert parsed.session_len == 131072 and len(node["gpus"]) == 8
    assert data["kv_cache"]["tp"] == 16  # the KV plan is per GPU with the total tp
    assert data["command"] is None  # no single command: each node runs its own
    assert [(c["role"], c["rank"], c["command"]) for c in data["commands"]] == [
        ("node", n["rank"], n["command"]) for n in nodes]
    assert data["capacity"]["sessions"] == data["memory"]["sessions_that_fit"]
    # the overlay hash: what every node compares; the same settings give the same hash, others not
    again = json.loads(launch(*args, "--json", "--node-rank", "1").stdout)
    assert data["overlay_sha256"] == again["overlay_sha256"]
    assert data["overlay_sha256"].startswith("sha256:") and len(data["overlay_sha256"]) == 7 + 64
    other = json.loads(launch("plan", "internlm2_5-7b-chat", "--factor", "2", "--json").stdout)
    assert other["overlay_sha256"] != data["overlay_sha256"]
    text = launch(*args)
    assert f"overlay hash   {data['overlay_sha256']}" in text.stdout
    assert "--node-rank 1 --dist-init-addr 10.0.0.1:29500" in text.stdout
    servers = [line for line in text.stdout.splitlines() if "lmdeploy serve api_server" in line]
    assert len(servers) == 2 and all("--nnodes 2" in line for line in servers)


def test_plan_overlay_hash_is_the_hash_of_what_the_overlay_holds(model_dir):
    """The hash covers the bytes launch writes into the overlay (less the machine's source path)."""
    import hashlib

    from launcher.model.modeldir import CONFIG
    from launcher.model.overlay import PROVENANCE
    from launcher.plan.build import PlanRequest, build_plan, make_overlay, overlay_digest

    plan = build_plan(PlanRequest(model=str(model_dir), factor="2"))
    overlay = make_overlay(plan)
    provenance = json.loads((overlay.path / PROVENANCE).read_text())
    provenance.pop("source")
    provenance.pop("files")  # the manifest: link targets are this machine's paths
    from launcher.model.overlay import config_bytes

    digest = hashlib.sha256()
    for part in ((overlay.path / CONFIG).read_bytes(), config_bytes(provenance)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    assert overlay_digest(plan) == "sha256:" + digest.hexdigest()


@pytest.mark.parametrize("flags, needles", [
    (["--replicas", "0"], ["--replicas", "from 1 to 256"]),
    (["--replicas", "two"], ["--replicas"]),
    (["--replicas", "2", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:29500"], ["--replicas", "--nnodes"]),
    (["--nnodes", "2"], ["--dist-init-addr", "rendezvous"]),
    (["--nnodes", "2", "--dist-init-addr", "0.0.0.0:29500"], ["--dist-init-addr", "real address"]),
    (["--nnodes", "2", "--dist-init-addr", "10.0.0.1"], ["--dist-init-addr", "HOST:PORT"]),
    (["--node-rank", "1"], ["--node-rank", "--nnodes"]),
    (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], ["--node-rank", "from 0 to 1"]),
    (["--tp", "2", "--replicas", "3"], ["--replicas 3 x --tp 2 needs 6 GPUs", "4 are visible"]),
    (["--tp", "3", "--replicas", "1", "--nnodes", "3", "--dist-init-addr", "h:1"], ["--tp", "32 attention heads"]),
    (["--tp", "8", "--nnodes", "3", "--dist-init-addr", "h:1"], ["--tp 8", "3 node"]),
    (["--port", "65535", "--replicas", "2"], ["--port '65535'", "give --port 65533 or lower"]),
    (["--routing", "random"], ["--routing 'random'", "--replicas N (2 or more)", "launch proxy start --routing"]),
    (["--replicas", "1", "--routing", "random"], ["--routing 'random'", "--replicas N"]),
    (["--nnodes", "2", "--dist-init-addr", "h:1", "--routing", "random"], ["--routing", "--replicas N"]),
    (["--replicas", "2", "--router", "lmdeploy", "--routing", "min_observed_latency"],
     ["min_observed_latency is refused"]),
    (["--replicas", "2", "--router", "lmdeploy", "--routing", "fastest"],
     ["not a routing strategy", "min_expected_latency, random"]),
    # --routing is lmdeploy's proxy's; --router picks the router of --replicas
    (["--replicas", "2", "--routing", "random"], ["--routing 'random'", "add --router lmdeploy"]),
    (["--replicas", "2", "--router", "vllm", "--routing", "random"], ["--routing 'random'", "add --router lmdeploy"]),
    (["--router", "lmdeploy"], ["--router 'lmdeploy'", "--replicas N (2 or more)"]),
    (["--replicas", "2", "--router", "nginx"], ["--router 'nginx'", "vllm", "lmdeploy"]),
])
def test_bad_scale_flags_are_one_line_errors(launch, flags, needles):
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "2", "--gpu-memory", "80", *flags,
                    env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert_one_line_error(result, *needles)


# --- launch serve: through the real CLI on a pretended GPU, STAND-IN engines -------------------

STANDIN_ENGINE = REPO / "tests" / "support" / "standin_engine_server.py"
KEY = "sk-scale-test"
# The CLI itself, on the pretended GPU (tests/integration/serve/test_serve.py's seam), with the stand-in engine as
# the serving process (serve's server_argv, the stand-in seam test_serve.py's driver uses).
CLI_DRIVER = PRETEND_GPU + (
    "import functools, sys\n"
    "import launcher.app.serve\n"
    f"launcher.app.serve.serve = functools.partial(launcher.app.serve.serve, server_argv=(sys.executable, {str(STANDIN_ENGINE)!r}))\n"
    "from launcher.cli import main\n"
    "main(sys.argv[1:])\n"
)


def start_serve(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / "serve.err"
    full_env = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO), **(env or {}))
    with open(err, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-c", CLI_DRIVER, "serve", *args], cwd=REPO, env=full_env,
                                stdout=subprocess.PIPE, stderr=handle, text=True)
    return proc, err


def closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def environ_of(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def listening(pid: int, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def test_replicas_2_behind_the_real_proxy_serve_a_chat_reaching_both_and_one_sigint_stops_all(model_dir, tmp_path):
    port = free_ports(3)
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--replicas", "2",
                            "--router", "lmdeploy", "--port", str(port),
                            env={"LAUNCH_API_KEYS": KEY, "CUDA_VISIBLE_DEVICES": "0,1"})
    root = f"http://127.0.0.1:{port}"
    replicas = [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"]
    groups: list[int] = []
    try:
        ready = "".join(read_until(proc, "curl", timeout=240))
        assert f"OpenAI API at {root}/v1 through lmdeploy's proxy, 2 replica(s)" in ready, ready
        assert f"replica 0  {replicas[0]}  GPUs 0" in ready and f"replica 1  {replicas[1]}  GPUs 1" in ready
        # the same access lines as one server's (ReadyInfo.access_lines): key hint, then the curl
        assert "API keys are required: export LAUNCH_API_KEY=" in ready and KEY not in ready
        assert f"curl {root}/v1/chat/completions" in ready
        assert ("routing min_expected_latency; launch's watchdog takes out a replica that stops answering /health "
                f"(`launch proxy status --proxy {root}` lists them)") in ready
        assert {u: n.models for u, n in proxy_nodes(root).items()} == {u: ("tiny",) for u in replicas}
        # each replica on its own GPU set, from the same overlay
        kids = children_of(proc.pid)
        engines = sorted((p for p in kids if str(STANDIN_ENGINE) in cmdline(p)), key=lambda p: cmdline(p))
        proxies = [p for p in kids if "launcher.engine.proxy_server" in cmdline(p)]
        assert len(engines) == 2 and len(proxies) == 1, [cmdline(p) for p in kids]
        groups = [*engines, *proxies]
        assert sorted(environ_of(p)["CUDA_VISIBLE_DEVICES"] for p in engines) == ["0", "1"]
        specs = [spec_seen(log) for log in (tmp_path / "cache" / "runs").glob("*/server.log")]
        assert len({s["model_path"] for s in specs}) == 1  # one overlay
        assert sorted(s["server_port"] for s in specs) == [port + 1, port + 2]
        assert all(s["server_name"] == "127.0.0.1" and s["api_keys"] == [key_digest(KEY)] for s in specs)
        assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
        # chats through the proxy: all answered, and both replicas answered some
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
        assert http.post(root + "/v1/chat/completions", body, timeout=20).status == 401  # the proxy wants a key
        for _ in range(12):
            reply = http.post(root + "/v1/chat/completions", body, api_key=KEY, timeout=20)
            assert reply.status == 200 and "error_code" not in reply.json(), reply.body
            assert reply.json()["choices"][0]["message"]["content"]
        counts = []
        for url in replicas:
            metrics = http.get(url + "/metrics", api_key=KEY, timeout=5).body.decode()
            counts.append(int(re.search(r"^lmdeploy_prompts_total (\d+)$", metrics, re.MULTILINE).group(1)))
        assert sum(counts) == 12 and min(counts) >= 1, counts
        # a replica that stops answering (SIGSTOP: its socket still accepts) is taken out by the
        # watchdog, and `launch proxy status` shows it, when and why, until it answers again
        here = {"LAUNCH_CACHE_DIR": str(tmp_path / "cache")}

        def status() -> dict:
            return json.loads(run_launch("proxy", "status", "--proxy", root, "--json", env=here).stdout)

        assert status()["removed_by_watchdog"] == []
        stuck = next(p for p in engines if listening(p, port + 2))
        os.kill(stuck, signal.SIGSTOP)
        try:
            assert wait_for(lambda: replicas[1] not in proxy_nodes(root), 15, 0.2), "not taken out"
            data = status()
            assert [n["url"] for n in data["nodes"]] == [replicas[0]]
            assert [(r["url"], r["models"], r["reason"]) for r in data["removed_by_watchdog"]] == [
                (replicas[1], ["tiny"], "/health no answer within 2 s (2 checks in a row)")]
        finally:
            os.kill(stuck, signal.SIGCONT)
        assert wait_for(lambda: replicas[1] in proxy_nodes(root), 15, 0.2), "not added back"
        assert wait_for(lambda: status()["removed_by_watchdog"] == [], 5)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert all(group_members(pgid) == [] for pgid in groups)  # every process group is empty
    assert all(closed(p) for p in (port, port + 1, port + 2))
    assert not (tmp_path / "cache" / "runs" / f"proxy-{port}" / "watchdog.json").exists()  # its state: gone too


def replica_processes(proc: subprocess.Popen) -> tuple[list[int], list[int]]:
    """(the stand-in engines, the router's processes: every other child of serve, whatever it calls
    itself: lmdeploy's proxy, or vllm-router, which renames itself ``vllm::router``, and launch's front)."""
    kids = children_of(proc.pid)
    engines = [p for p in kids if str(STANDIN_ENGINE) in cmdline(p)]
    return engines, [p for p in kids if p not in engines]


def test_a_replica_dying_stops_the_whole_set_with_its_log(model_dir, tmp_path):
    port = free_ports(3)
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--replicas", "2",
                            "--port", str(port), "--router", "lmdeploy", "--routing", "random",
                            env={"CUDA_VISIBLE_DEVICES": "0,1"})
    with killed_if_running(proc):
        ready = "".join(read_until(proc, "curl", timeout=240))
        # --routing reaches the proxy serve runs: its spec, and lmdeploy's proxy started with it
        assert "routing random;" in ready, ready
        run_dir = tmp_path / "cache" / "runs" / f"proxy-{port}"
        assert "routing random, API keys off" in (run_dir / "proxy.log").read_text()
        assert not list((tmp_path / "cache").rglob("*spec*.json"))  # every spec went through a pipe
        engines, proxies = replica_processes(proc)
        assert len(engines) == 2 and len(proxies) == 1
        os.kill(engines[0], signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == 1
    errors = [line for line in err.read_text().splitlines() if line.startswith("launch: error:")]
    assert len(errors) == 1 and "was killed by SIGKILL" in errors[0] and "server.log" in errors[0], errors
    assert all(group_members(pgid) == [] for pgid in (*engines, *proxies))
    assert all(closed(p) for p in (port, port + 1, port + 2))


@pytest.mark.parametrize("router, processes", [([], 2), (["--router", "lmdeploy"], 1)], ids=["default", "lmdeploy"])
def test_ctrl_c_while_the_replicas_start_leaves_no_process(model_dir, tmp_path, router, processes):
    """The default router is two processes (vllm-router and launch's front), lmdeploy's proxy one."""
    port = free_ports(3)
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--replicas", "2",
                            "--port", str(port), *router, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    with killed_if_running(proc):
        assert wait_for(lambda: "replica(s) starting" in err.read_text() or proc.poll() is not None, 120)
        engines, proxies = replica_processes(proc)
        assert len(engines) == 2 and len(proxies) == processes, err.read_text()
        assert all(group_members(pgid) for pgid in (*engines, *proxies))  # each leads a group of its own
        proc.send_signal(signal.SIGINT)  # the router is still starting (lmdeploy's imports torch)
        proc.wait(timeout=60)
    assert proc.returncode == 0, err.read_text()[-2000:]
    assert all(group_members(pgid) == [] for pgid in (*engines, *proxies))
    assert proc.stdout.read() == ""  # never announced


def test_replicas_beyond_the_visible_gpus_stop_before_anything_is_written(model_dir, tmp_path):
    cache = tmp_path / "cache"
    result = launch_with_gpu("serve", str(model_dir), "--factor", "2", "--backend", "pytorch", "--replicas", "3",
                             env={"LAUNCH_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": "0,1"})
    assert_one_line_error(result, "--replicas 3 x --tp 1 needs 3 GPUs", "2 are visible")
    assert not cache.exists()


@pytest.mark.parametrize("flags, needles", [
    (["--replicas", "2", "--proxy-url", "http://127.0.0.1:9"], ["--proxy-url", "runs its own proxy"]),
    (["--advertise-url", "http://10.0.0.5:23333"], ["--advertise-url", "--proxy-url"]),
    (["--host", "0.0.0.0", "--api-key", "k", "--proxy-url", "http://127.0.0.1:9"], ["--advertise-url", "0.0.0.0"]),
    (["--nnodes", "2", "--dist-init-addr", "10.0.0.1:29500"], ["--node-rank", "0 to 1"]),
    (["--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:29500", "--proxy-url", "http://h:1"],
     ["--proxy-url", "only rank 0"]),
    (["--replicas", "2", "--probe"], ["--probe", "launch probe --url"]),
    (["--proxy-url", "http://10.0.0.1:8000"], ["--advertise-url", "cannot reach this machine's loopback"]),
    (["--routing", "random"], ["--routing 'random'", "--replicas N (2 or more)"]),
    (["--routing", "random", "--proxy-url", "http://127.0.0.1:9"], ["--routing 'random'", "--replicas N"]),
    (["--replicas", "2", "--router", "lmdeploy", "--routing", "min_observed_latency"],
     ["min_observed_latency is refused"]),
    (["--replicas", "2", "--routing", "random"], ["--routing 'random'", "add --router lmdeploy"]),
    (["--router", "lmdeploy"], ["--router 'lmdeploy'", "--replicas N (2 or more)"]),
])
def test_bad_serve_scale_flags_write_nothing(model_dir, tmp_path, flags, needles):
    cache = tmp_path / "cache"
    result = launch_with_gpu("serve", str(model_dir), "--factor", "2", "--backend", "pytorch", *flags,
                             env={"LAUNCH_CACHE_DIR": str(cache)})
    assert_one_line_error(result, *needles)
    assert not cache.exists()


def test_an_unreachable_proxy_url_stops_serve_before_anything_slow(model_dir, tmp_path):
    cache = tmp_path / "cache"
    result = launch_with_gpu("serve", str(model_dir), "--factor", "2", "--backend", "pytorch",
                             "--proxy-url", f"http://127.0.0.1:{free_port()}", env={"LAUNCH_CACHE_DIR": str(cache)})
    assert_one_line_error(result, "does not answer its node API")
    assert not (cache / "overlays").exists()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    port = free_port()
    proc, _out, err = start_launch_proxy(tmp, port)
    yield f"http://127.0.0.1:{port}"
    assert stop(proc) == 0, err.read_text()[-2000:]


def test_proxy_url_registers_only_after_health_and_leaves_on_stop(model_dir, tmp_path, proxy):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:  # when the node first shows in the proxy, and when its /health first answered 200
        while not done.is_set():
            now = time.monotonic()
            if "healthy" not in seen and http.status_of(url + "/health", timeout=0.5) == 200:
                seen["healthy"] = now
            if "registered" not in seen and url in proxy_nodes(proxy):
                seen["registered"] = time.monotonic()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--port", str(port),
                            "--proxy-url", proxy + "/")
    try:
        ready = "".join(read_until(proc, "registered with the proxy", timeout=120))
        assert f"as {url} (it leaves the proxy when stopped)" in ready
        assert {u: n.models for u, n in proxy_nodes(proxy).items()} == {url: ("tiny",)}
        assert wait_for(lambda: "registered" in seen, 5)
        assert "healthy" in seen and seen["healthy"] <= seen["registered"], seen
        chat = http.post(proxy + "/v1/chat/completions",
                         {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
        assert chat.status == 200 and "error_code" not in chat.json(), chat.body
    finally:
        done.set()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0, err.read_text()[-3000:]
    # gone at once: before a health check of the router's (2 s rounds, 2 failures) could have taken it out
    assert proxy_nodes(proxy) == {}
    assert "left the proxy at" in err.read_text()
    assert closed(port)


def test_proxy_url_replica_whose_engine_dies_leaves_the_proxy_at_once(model_dir, tmp_path, proxy):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--port", str(port),
                            "--proxy-url", proxy)
    with killed_if_running(proc):
        read_until(proc, "registered with the proxy", timeout=120)
        assert url in proxy_nodes(proxy)
        engines = [p for p in children_of(proc.pid) if str(STANDIN_ENGINE) in cmdline(p)]
        assert len(engines) == 1
        os.kill(engines[0], signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == 1
    text = err.read_text()
    assert "was killed by SIGKILL (out of memory?) after it was ready" in text and "left the proxy at" in text, text
    assert proxy_nodes(proxy) == {}


def test_a_replica_the_proxy_cannot_reach_is_stopped_with_one_line(model_dir, tmp_path, proxy):
    port = free_port()
    wrong = f"http://127.0.0.1:{free_port()}"  # the proxy would route to a port nobody serves
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--port", str(port),
                            "--proxy-url", proxy, "--advertise-url", wrong)
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in err.read_text().splitlines() if line.startswith("launch: error:")]
    assert proc.returncode == 1 and len(lines) == 1, err.read_text()
    assert "could not be registered with the proxy" in lines[0] and "it was stopped" in lines[0]
    assert "Serving" not in out  # never announced
    assert proxy_nodes(proxy) == {} and closed(port)


def test_smoke_replicas_mode_parses_and_refuses_cleanly_without_gpus(tmp_path):
    from launcher.runtime.gpu import nvidia_problem

    if nvidia_problem() is None:
        pytest.skip("this machine has a GPU: the smoke test would run")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke.py"), "--replicas", "2"], capture_output=True,
                         text=True, timeout=60, cwd=REPO, env=dict(os.environ, SMOKE_OUT=str(tmp_path / "smoke")),
                         check=False)
    assert run.returncode == 1 and "SMOKE PASSED" not in run.stdout
    assert run.stderr.strip() == ("SMOKE FAILED: --replicas 2 needs 2 NVIDIA GPUs: " + nvidia_problem())
    assert not (tmp_path / "smoke").exists()  # stopped before building the model
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke.py"), "--replicas", "zero"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert bad.returncode == 2 and "--replicas" in bad.stderr


# --- launch serve --nnodes: what can be checked without GPUs --------------------------------------


def test_serve_nnodes_dry_run_shows_the_node_layout(launch):
    args = ("serve", "internlm2_5-7b-chat", "--factor", "4", "--tp", "16", "--nnodes", "2",
            "--dist-init-addr", "10.0.0.1:29500", "--gpu-memory", "80", "--dry-run")
    result = launch(*args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [n["rank"] for n in data["nodes"]] == [0, 1] and data["kv_cache"]["tp"] == 16
    assert data["overlay_sha256"].startswith("sha256:")
    assert "TurbomindEngineConfig(" in data["engine_call"] and "tp=16" in data["engine_call"]


def test_serve_replicas_dry_run_shows_a_replicas_engine_call_not_one_on_the_proxys_port(launch, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = ("serve", "internlm2_5-7b-chat", "--factor", "2", "--replicas", "2", "--port", "9000", "--gpu-memory", "80",
            "--dry-run")
    data = json.loads(launch(*args, "--json").stdout)
    assert "server_name='127.0.0.1', server_port=9001" in data["engine_call"]
    assert data["command"] is None and [c["role"] for c in data["commands"]] == ["proxy", "replica", "replica"]
    text = launch(*args).stdout
    assert "engine call (in replica 0's serving process; each replica's differs only in its port):" in text
    assert "server_port=9001" in text and "server_port=9000" not in text


def test_node_spec_hands_lmdeploy_the_multi_node_fields(tmp_path, monkeypatch):
    """What the serving process of node 1 gets: lmdeploy's real TurbomindEngineConfig with the
    total tp, nnodes, node_rank and dist_init_addr (the fields `lmdeploy serve api_server --nnodes`
    sets from its flags)."""
    from lmdeploy.messages import TurbomindEngineConfig

    from launcher.app.serve import _spec
    from launcher.engine.spec import backend_config
    from launcher.plan.build import PlanRequest, build_plan

    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat", factor="4", tp=16, nnodes=2, gpu_memory_gib=80,
                                  dist_init_addr="10.0.0.1:29500"))
    spec, _log = _spec(plan, tmp_path / "overlay", {"nnodes": 2, "node_rank": 1, "dist_init_addr": "10.0.0.1:29500"})
    config = backend_config(json.loads(spec))
    assert type(config) is TurbomindEngineConfig
    assert (config.tp, config.nnodes, config.node_rank, config.dist_init_addr) == (16, 2, 1, "10.0.0.1:29500")
    assert config.session_len == 131072


def test_serve_checks_the_gpus_of_one_node_with_the_total_tp():
    from dataclasses import replace

    from launcher.app.serve import _check_gpus
    from launcher.plan.build import PlanRequest, build_plan
    from launcher.rules.checks import BadOption

    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat", factor="4", tp=16, nnodes=2, gpu_memory_gib=80,
                                  dist_init_addr="10.0.0.1:29500"))
    _check_gpus(replace(plan, gpu_count=8))  # 16 over 2 nodes: 8 here
    with pytest.raises(BadOption) as err:
        _check_gpus(replace(plan, gpu_count=4))
    assert "each node needs 8 GPUs" in str(err.value) and "has 4" in str(err.value)


@pytest.mark.parametrize("flags", [
    ["--replicas", "0"], ["--nnodes", "2", "--dist-init-addr", "h:1"], ["--advertise-url", "http://h:1"],
    ["--replicas", "2", "--probe"], ["--proxy-url", "http://10.0.0.1:8000"],
    ["--routing", "random"], ["--replicas", "2", "--router", "lmdeploy", "--routing", "fastest"],
    ["--replicas", "2", "--routing", "random"], ["--router", "lmdeploy"],
])
def test_scale_flags_are_refused_before_any_request_for_a_repo_id(hub, flags):
    result = launch_with_gpu("serve", "org/tiny", "--factor", "2", *flags)
    assert_one_line_error(result)
    assert hub.requests() == []
