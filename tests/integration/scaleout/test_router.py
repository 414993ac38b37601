"""The default router: vllm-router (the real one, pinned in pyproject.toml) on a loopback port of its own,
behind launch's front (launcher/engine/router_front.py) on the public port, as `launch proxy start` and
`launch serve --replicas` run it; replicas are STAND-INs (tests/support/standin_replica.py over
tests/support/standin_openai.py: lmdeploy's api_server's endpoints and JSON, no GPU engine).

What is proved here, with real processes: the ready lines and the processes they name; lmdeploy's node
API through the front (`launch proxy add/status/remove`); chats and streams passed through as they come;
a killed replica costs no request (lmdeploy's proxy, same schedule, loses some) and a stopped one is
taken out by vllm-router's health checks; client keys at the front, passed on to the replicas; the node
API closed to clients (a key, or this machine only); `serve --replicas 2` through the CLI; what happens
without vllm-router installed. Every process started is stopped, and each test checks that none is left
(by process group: vllm-router renames itself ``vllm::router``).

lmdeploy's proxy (`--router lmdeploy`) has test_proxy.py, test_scaleout_edges.py and test_scale_serve.py.
"""

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
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from launcher.net import http
from launcher.runtime.address import free_ports
from launcher.runtime.process import group_members
from launcher.scaleout.nodes import add_node, deregister, proxy_nodes
from tests.conftest import REPO, assert_one_line_error, free_port, killed_if_running
from tests.integration.scaleout.test_proxy import (
    MODEL,
    Replicas,
    answered,
    children_of,
    served_count,
    stop,
    wait_for,
)
from tests.unit.rules.test_limits import run  # launch ARGV in this process: (exit code, stdout, stderr)

KEY = "router-test-key-1"
READY_TIMEOUT_S = 180.0  # lmdeploy's proxy (the comparison) imports torch: seconds here, more when busy
HEALTH_OUT_LIMIT_S = 10.0  # a stopped replica out of rotation: 2 checks failed, 2 s apart, 2 s each (+ margin)


# --- helpers -----------------------------------------------------------------------------------------


def start_router(tmp: Path, port: int, *extra: str, keys: str | None = None,
                 env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """`launch proxy start --port PORT EXTRA` in a real subprocess, its keys (if any) through
    LAUNCH_API_KEYS (never on a command line); returns once it said "Proxy ready"."""
    full = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=str(REPO), **(env or {}))
    full.pop("LAUNCH_API_KEYS", None)
    if keys:
        full["LAUNCH_API_KEYS"] = keys
    out, err = tmp / f"proxy-{port}.out", tmp / f"proxy-{port}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "proxy", "start", "--port", str(port), *extra],
                                stdout=o, stderr=e, env=full)
    ready = wait_for(lambda: "Proxy ready" in out.read_text() or proc.poll() is not None, READY_TIMEOUT_S, 0.1)
    if not ready or proc.poll() is not None:
        stop(proc)
        pytest.fail(f"launch proxy start did not become ready: {err.read_text()[-2000:]}")
    return proc, out, err


def cmdline(pid: int) -> str:
    """What ps shows for ``pid`` (a process title set by the process itself, as vllm-router's, included)."""
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return ""


def listens(pid: int, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except psutil.Error:
        return False


def left_running(pgids) -> list[int]:
    """The live processes of these process groups (each server of launch's leads its own)."""
    return [pid for pgid in pgids for pid in group_members(pgid)]


def router_argv(out_text: str) -> list[str]:
    """vllm-router's command line, from the ready lines' "equivalent:" line."""
    (line,) = [line for line in out_text.splitlines() if line.strip().startswith("equivalent: ")]
    return line.split("equivalent: ", 1)[1].split()


def router_args(out_text: str):
    """vllm-router's command line as vllm-router's own parser reads it (it exits on a flag it lacks)."""
    from vllm_router.launch_router import parse_router_args

    argv = router_argv(out_text)
    assert argv[0] == "vllm-router", argv
    return parse_router_args(argv[1:])


def inner_url(out_text: str) -> str:
    """Where vllm-router itself listens (loopback, its own port): for what launch's front does not show."""
    args = router_args(out_text)
    return f"http://{args.host}:{args.port}"


def inner_url_from_log(log: Path) -> str:
    """The same, from the command line launch wrote at the head of vllm-router's log (``serve --replicas``
    prints no equivalent line)."""
    from vllm_router.launch_router import parse_router_args

    head = log.read_text().splitlines()[0]
    argv = head.split(": ", 1)[1].split()
    assert Path(argv[0]).name == "vllm-router", head
    args = parse_router_args(argv[1:])
    return f"http://{args.host}:{args.port}"


def router_workers(inner: str) -> dict[str, bool]:
    """vllm-router's own worker table: URL -> healthy."""
    data = http.get(inner + "/workers", timeout=5).json()
    return {w["url"]: w["is_healthy"] for w in data["workers"]}


def chat_body(text: str = "hello there", stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **({"stream": True} if stream else {})}


def try_chat(root: str, key: str | None = None, timeout: float = 20) -> bool:
    """One chat: answered in time (200 and a stand-in's answer), or not (any status, error body, deadline)."""
    try:
        return answered(http.post(root + "/v1/chat/completions", chat_body(), api_key=key, timeout=timeout))
    except (http.Unreachable, http.DeadlineExceeded):
        return False


def sse(url: str, text: str) -> tuple[list[str], list[float], str | None]:
    """A streaming chat to ``url``: (each ``data:`` payload in order, the seconds after the request
    at which each arrived, the content type)."""
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=30)
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(text, stream=True)),
                     {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()[:300]
        payloads, times = [], []
        while line := reply.readline():
            if line.startswith(b"data: "):
                payloads.append(line[len(b"data: "):].strip().decode())
                times.append(time.monotonic() - started)
        return payloads, times, reply.getheader("content-type")
    finally:
        conn.close()


def streamed_text(payloads: list[str]) -> str:
    return "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads if p != "[DONE]")


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback (the one a route out would use), or None."""
    import ipaddress

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent (UDP connect only picks a route)
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0" else address


# --- the module's router: `launch proxy start`, default router, no keys, emptied before each test -------


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    port = free_port()
    proc, out, err = start_router(tmp, port)
    kids = children_of(proc.pid)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "proc": proc, "out": out, "err": err, "kids": kids,
           "cache": tmp / "cache", "inner": inner_url(out.read_text())}
    assert stop(proc) == 0, err.read_text()[-2000:]
    assert left_running(kids) == []


@pytest.fixture
def empty_router(router):
    for url in proxy_nodes(router["url"]):
        deregister(router["url"], url)
    assert proxy_nodes(router["url"]) == {} and router_workers(router["inner"]) == {}
    return router


@pytest.fixture
def replicas(tmp_path):
    group = Replicas(tmp_path)
    yield group
    group.close()
    assert all(proc.poll() is not None for proc in group.procs.values())


# --- ready lines, processes, the front's own paths --------------------------------------------------


@pytest.mark.slow
def test_the_ready_lines_name_vllm_router_and_its_two_processes_are_the_ones_they_say(router):
    root, text = router["url"], router["out"].read_text()
    lines = text.splitlines()
    assert lines[0].startswith(f"Proxy ready: {root}  (vllm-router behind launch's front: routes by load, "
                               "retries a failed request on another replica"), lines[0]
    assert f"  OpenAI API {root}/v1" in lines and "API keys required" not in text
    assert "  node API (add, remove, status): from this machine only" in lines
    run_dir = router["cache"] / "runs" / f"proxy-{router['port']}"
    assert f"  log {run_dir / 'front.log'}" in lines
    assert (run_dir / "router.log").is_file() and (run_dir / "front.log").is_file()
    assert "watchdog" not in text  # vllm-router checks /health itself: launch runs no watchdog for it
    # the equivalent command is vllm-router's, as its own parser reads it: loopback, a port of its own
    args = router_args(text)
    assert (args.host, args.policy, args.health_check_interval_secs) == ("127.0.0.1", "power_of_two", 2)
    assert args.port != router["port"] and args.prometheus_host == "127.0.0.1"
    # two processes, each leading its own group: vllm-router (it renames itself) on that port, the front on ours
    kids = router["kids"]
    assert len(kids) == 2 and all(group_members(kid) for kid in kids), [cmdline(k) for k in kids]
    (inner,) = [k for k in kids if listens(k, args.port)]
    (front,) = [k for k in kids if listens(k, router["port"])]
    assert cmdline(inner) == "vllm::router" and "launcher.engine.router_front" in cmdline(front)
    assert http.get(root + "/router", timeout=5).json() == {"router": "vllm-router", "front": "launch"}
    health = http.get(root + "/health", timeout=5)
    assert (health.status, health.json()) == (200, {"status": "healthy", "router": "vllm-router"})


@pytest.mark.slow
def test_two_starts_on_one_port_one_serves_the_other_refuses_in_one_line_having_started_nothing(tmp_path):
    port = free_port()
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    env.pop("LAUNCH_API_KEYS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "launcher", "proxy", "start", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    kids: list[int] = []
    try:
        assert wait_for(lambda: any(p.poll() is not None for p in procs), 120, 0.05), "neither was refused"
        (loser,) = [p for p in procs if p.poll() is not None]
        (winner,) = [p for p in procs if p is not loser]
        out, err = loser.communicate(timeout=10)
        assert loser.returncode != 0 and out == "" and err.count("\n") == 1, err
        assert err.startswith("launch: error: ") and f"port {port}" in err and "already in use" in err, err
        root = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: http.status_of(root + "/health", timeout=1) == 200, 60, 0.1)
        kids = children_of(winner.pid)
        assert len(kids) == 2 and http.get(root + "/router", timeout=5).json()["router"] == "vllm-router"
    finally:
        for proc in procs:
            stop(proc)
    assert winner.returncode == 0
    assert left_running(kids) == []


# --- lmdeploy's node API through the front ------------------------------------------------------------


@pytest.mark.slow
def test_proxy_add_status_remove_work_through_the_front(empty_router, replicas, launch):
    root, inner = empty_router["url"], empty_router["inner"]
    a, b = replicas.start(key=None), replicas.start(key=None)
    for url in (a, b):
        result = launch("proxy", "add", url, "--proxy", root)
        assert (result.returncode, result.stdout.strip()) == (0, f"added {url} ({MODEL})"), result.stderr
    again = launch("proxy", "add", a + "/", "--proxy", root)
    assert again.stdout.strip() == f"already registered as {a} ({MODEL}): not added twice", again.stderr
    # the front's node list, in lmdeploy's shape, and vllm-router's own table: the same two
    assert http.get(root + "/nodes/status", timeout=5).json() == {u: {"models": [MODEL], "unfinished": None}
                                                                 for u in (a, b)}
    assert router_workers(inner) == {a: True, b: True}
    text = launch("proxy", "status", "--proxy", root)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"proxy {root}: 2 node(s), 2 healthy"
    assert re.search(r"^NODE\s+MODELS\s+HEALTH\s+IN FLIGHT$", text.stdout, re.MULTILINE), text.stdout
    for url in (a, b):
        assert re.search(rf"^{re.escape(url)}\s+{MODEL}\s+healthy\s+-$", text.stdout, re.MULTILINE), text.stdout
    assert text.stdout.splitlines()[-1] == "router: vllm-router behind launch's front"  # which one answers there
    data = json.loads(launch("proxy", "status", "--proxy", root, "--json").stdout)
    assert data["router"] == "vllm-router behind launch's front"
    assert data["nodes"] == [{"url": u, "models": [MODEL], "unfinished": None, "healthy": True, "health": "healthy"}
                             for u in sorted((a, b))]
    assert data["removed_by_watchdog"] is None  # no watchdog with this router
    assert all(answered(http.post(root + "/v1/chat/completions", chat_body(), timeout=20)) for _ in range(3))

    removed = launch("proxy", "remove", b, "--proxy", root)
    assert (removed.returncode, removed.stdout.strip()) == (0, f"removed {b}"), removed.stderr
    assert list(proxy_nodes(root)) == [a] and router_workers(inner) == {a: True}
    assert_one_line_error(launch("proxy", "remove", b, "--proxy", root), f"not a node of the proxy at {root}",
                          f"its nodes: {a}", code=2)
    replicas.kill(a)  # gone: `proxy status` checks each node's /health itself and says so
    text = launch("proxy", "status", "--proxy", root)
    assert re.search(rf"^{re.escape(a)}\s+{MODEL}\s+connection refused\s+-$", text.stdout, re.MULTILINE), text.stdout


@pytest.mark.slow
def test_status_says_the_in_flight_count_is_unknown_rather_than_a_false_0(empty_router, replicas, launch):
    """vllm-router asks each replica for its load, and lmdeploy's api_server has no such endpoint (-1): the
    front says it does not know (null, "-") instead of a 0 that would read as an idle replica."""
    root = empty_router["url"]
    slow = replicas.start("--reply-seconds", "4", "--log-chats", key=None)
    add_node(slow, root)
    log = replicas.log_dir / f"replica-{slow.rsplit(':', 1)[1]}.log"
    threads = [threading.Thread(target=try_chat, args=(root,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: log.read_text().count("standin: chat start") == 3, 10), log.read_text()
        data = json.loads(launch("proxy", "status", "--proxy", root, "--json").stdout)
        assert [(n["url"], n["unfinished"]) for n in data["nodes"]] == [(slow, None)]  # lmdeploy's proxy says 3
        text = launch("proxy", "status", "--proxy", root).stdout
        assert re.search(rf"^{re.escape(slow)}\s+{MODEL}\s+healthy\s+-$", text, re.MULTILINE), text
    finally:
        for thread in threads:
            thread.join()


# --- what passes through the front -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_chat_and_a_stream_pass_through_as_the_replica_sends_them(empty_router, replicas):
    root = empty_router["url"]
    url = replicas.start("--reply-seconds", "1", key=None)  # a stream spreads the second over its chunks
    add_node(url, root)
    prompt = "one two three four five six seven eight"
    through, direct = (http.post(u + "/v1/chat/completions", chat_body(prompt), timeout=20) for u in (root, url))
    assert through.status == direct.status == 200
    assert through.json().keys() == direct.json().keys()
    assert through.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]
    assert through.json()["choices"][0]["message"]["content"] == f"stand-in reply to: {prompt}"

    payloads, times, kind = sse(root, prompt)
    alone, _alone_times, alone_kind = sse(url, prompt)
    # an event stream both ways (vllm-router writes the media type without lmdeploy's "; charset=utf-8")
    assert kind.split(";")[0] == alone_kind.split(";")[0] == "text/event-stream", (kind, alone_kind)
    assert payloads[-1] == alone[-1] == "[DONE]"
    assert len(payloads) == len(alone) == len(f"stand-in reply to: {prompt}".split()) + 1  # a chunk a word, [DONE]
    assert streamed_text(payloads) == streamed_text(alone) == f"stand-in reply to: {prompt}"
    # chunk by chunk as the replica wrote them (~0.09 s apart), not held back until the end
    assert times[-1] - times[0] >= 0.5, times
    assert times[0] < 0.6 * times[-1], times


# --- retries: a killed replica costs no request; a stopped one is taken out ------------------------------------


def kill_schedule(root: str, replicas: Replicas, urls: list[str]) -> tuple[str, int, dict[str, int]]:
    """Warm up with 6 chats, SIGKILL the replica that answered most of them, then 30 chats in a row:
    (the killed replica, how many of the 30 failed, each replica's chats answered before the kill)."""
    assert all(try_chat(root) for _ in range(6))
    counts = {u: served_count(u, None) for u in urls}
    assert sum(counts.values()) == 6, counts
    killed = max(counts, key=counts.get)
    replicas.kill(killed)
    return killed, sum(not try_chat(root) for _ in range(30)), counts


def stop_the_busy_one(root: str, inner: str, replicas: Replicas, alive: list[str], busy: str) -> None:
    """SIGSTOP ``busy`` (its socket still accepts, nothing answers; SIGCONT after): vllm-router's health
    checks take it out within seconds, and then every chat is answered in time by the one left."""
    (other,) = [u for u in alive if u != busy]
    os.kill(replicas.procs[busy].pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        assert wait_for(lambda: router_workers(inner).get(busy) is False, 2 * HEALTH_OUT_LIMIT_S, 0.2)
        assert time.monotonic() - began <= HEALTH_OUT_LIMIT_S, time.monotonic() - began
        before = served_count(other, None)
        for _ in range(20):
            started = time.monotonic()
            assert try_chat(root, timeout=5)
            assert time.monotonic() - started < 3.0
        assert served_count(other, None) == before + 20  # all answered by the one left
    finally:
        os.kill(replicas.procs[busy].pid, signal.SIGCONT)
    assert wait_for(lambda: router_workers(inner).get(busy) is True, HEALTH_OUT_LIMIT_S, 0.2)  # back


def fault_schedule(tmp_path: Path, replicas: Replicas, *flags: str) -> int:
    """A router (``launch proxy start FLAGS``) before 3 fresh replicas: ``kill_schedule``, then for the
    default router ``stop_the_busy_one``. The failures after the kill; every process stopped."""
    port = free_port()
    proc, out, err = start_router(tmp_path, port, *flags)
    kids = children_of(proc.pid)
    root = f"http://127.0.0.1:{port}"
    try:
        urls = [replicas.start(key=None) for _ in range(3)]
        for url in urls:
            add_node(url, root)
        killed, lost, before_kill = kill_schedule(root, replicas, urls)
        if not flags:
            alive = [u for u in urls if u != killed]
            counts = {u: served_count(u, None) for u in alive}
            assert sum(counts[u] - before_kill[u] for u in alive) == 30 - lost, counts  # answered by the others
            stop_the_busy_one(root, inner_url(out.read_text()), replicas, alive, max(alive, key=counts.get))
    finally:
        code = stop(proc)
        for url in list(replicas.procs):
            replicas.kill(url)
        replicas.procs.clear()
    assert code == 0, err.read_text()[-2000:]
    assert left_running(kids) == []
    return lost


@pytest.mark.slow
def test_a_killed_replica_costs_no_request_and_a_stopped_one_is_taken_out(tmp_path, replicas):
    """The same schedule against both routers: with lmdeploy's proxy the killed replica answers
    errors until launch's watchdog takes it out (seconds later); vllm-router retries on another."""
    losses = {"vllm": fault_schedule(tmp_path, replicas), "lmdeploy": fault_schedule(tmp_path, replicas, "--router",
                                                                                     "lmdeploy")}
    assert losses["vllm"] == 0, losses
    assert losses["lmdeploy"] > 0, losses  # what the default router fixes


# --- API keys ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_api_keys_at_the_front_passed_on_to_the_replicas_and_the_node_api_needs_one(tmp_path, replicas, launch):
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    proc, out, err = start_router(tmp_path, port, keys=KEY)
    kids = children_of(proc.pid)
    try:
        text = out.read_text()
        assert f"  OpenAI API {root}/v1   API keys required" in text
        assert "  node API (add, remove, status): with an API key" in text
        assert KEY not in text and KEY not in err.read_text()
        assert not [k for k in kids if KEY in cmdline(k)] and KEY not in cmdline(proc.pid)  # not in ps
        assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]

        url = replicas.start(key=KEY)  # the replica wants the same key
        assert_one_line_error(launch("proxy", "add", url, "--proxy", root), "--api-key")
        assert_one_line_error(launch("proxy", "add", url, "--proxy", root, "--api-key", "wrong-key"), "rejected")
        added = launch("proxy", "add", url, "--proxy", root, "--api-key", KEY)
        assert (added.returncode, added.stdout.strip()) == (0, f"added {url} ({MODEL})"), added.stderr

        # the OpenAI API: 401 at the front without one of its keys (the front's own answer, not the replica's)
        for key in (None, "wrong-key"):
            refused = http.post(root + "/v1/chat/completions", chat_body(), api_key=key, timeout=10)
            assert refused.status == 401 and refused.json()["error"]["message"] == "invalid or missing API key"
        assert http.get(root + "/v1/models", timeout=5).status == 401
        # with the key: answered; the replica itself wants it, so vllm-router passed the client's header on
        assert http.post(url + "/v1/chat/completions", chat_body(), timeout=5).status == 401
        assert all(answered(http.post(root + "/v1/chat/completions", chat_body(), api_key=KEY, timeout=20))
                   for _ in range(3))
        assert http.get(root + "/v1/models", api_key=KEY, timeout=5).json()["data"][0]["id"] == MODEL
        assert http.get(root + "/health", timeout=5).status == 200  # open, as lmdeploy's

        # the node API: a key even from this machine
        other = f"http://127.0.0.1:{free_port()}"
        for method, path, body in (("GET", "/nodes/status", None), ("GET", "/router", None),
                                   ("POST", "/nodes/add", {"url": other, "status": {"models": [MODEL]}}),
                                   ("POST", "/nodes/remove", {"url": url})):
            reply = http.request(method, root + path, json_body=body, timeout=5)
            assert reply.status == 401, (path, reply.status, reply.body[:200])
            assert "API key" in reply.json()["error"]["message"]
        assert list(proxy_nodes(root, key=KEY)) == [url]  # nothing added, nothing removed

        assert_one_line_error(launch("proxy", "status", "--proxy", root), "refused to list its nodes",
                              "give --api-key KEY")
        assert_one_line_error(launch("proxy", "status", "--proxy", root, "--api-key", "wrong-key"), "rejected")
        for how in ({"args": ("--api-key", KEY)}, {"env": {"LAUNCH_API_KEY": KEY}}):
            listed = launch("proxy", "status", "--proxy", root, *how.get("args", ()), env=how.get("env"))
            assert listed.returncode == 0, listed.stderr
            assert re.search(rf"^{re.escape(url)}\s+{MODEL}\s+healthy\s+-$", listed.stdout, re.MULTILINE)
        assert_one_line_error(launch("proxy", "remove", url, "--proxy", root), "--api-key")
        removed = launch("proxy", "remove", url, "--proxy", root, "--api-key", KEY)
        assert (removed.returncode, removed.stdout.strip()) == (0, f"removed {url}"), removed.stderr
        assert proxy_nodes(root, key=KEY) == {}
    finally:
        code = stop(proc)
    assert code == 0, err.read_text()[-2000:]
    assert left_running(kids) == []


# --- the node API without keys: this machine only -------------------------------------------------------------


def test_control_allowed_takes_a_loopback_peer_without_keys_and_a_key_with_keys():
    from launcher.engine.router_front import Front

    def peer(remote: str | None, authorization: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(remote=remote, headers={"Authorization": authorization} if authorization else {})

    open_front = Front({"router_url": "http://127.0.0.1:9"})
    for remote, allowed in (("127.0.0.1", True), ("::1", True), ("127.0.0.2", True), ("10.0.0.5", False),
                            ("192.0.2.2", False), ("2001:db8::1", False), ("fe80::1%eth0", False),
                            (None, False), ("", False), ("not an address", False)):
        assert open_front.control_allowed(peer(remote)) is allowed, remote
        assert open_front.client_allowed(peer(remote)) is True  # the OpenAI API: open without keys
    assert open_front.control_allowed(peer("10.0.0.5", f"Bearer {KEY}")) is False  # no keys: a key opens nothing

    keyed = Front({"router_url": "http://127.0.0.1:9", "api_keys": [KEY, "second-key"]})
    for remote in ("127.0.0.1", "::1", "10.0.0.5"):
        assert keyed.control_allowed(peer(remote)) is False, remote  # with keys: a key, even from this machine
        assert keyed.control_allowed(peer(remote, f"Bearer {KEY}")) is True
        assert keyed.control_allowed(peer(remote, "Bearer second-key")) is True
        assert keyed.control_allowed(peer(remote, "Bearer wrong-key")) is False
        assert keyed.control_allowed(peer(remote, f"Basic {KEY}")) is False
        assert keyed.control_allowed(peer(remote, KEY)) is False
    # the refusals: one line each, saying what to do
    for front, status, needle in ((open_front, 403, "--api-key"), (keyed, 401, "Authorization: Bearer KEY")):
        refusal = front.control_refusal()
        message = json.loads(refusal.body)["error"]["message"]
        assert refusal.status == status and needle in message and "\n" not in message


@pytest.mark.slow
def test_without_keys_the_node_api_refuses_a_peer_from_another_machine(tmp_path, launch, monkeypatch):
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1,localhost,{address}")
    monkeypatch.setenv("no_proxy", f"127.0.0.1,localhost,{address}")
    port = free_port()
    proc, _out, err = start_router(tmp_path, port, "--host", "0.0.0.0")
    kids = children_of(proc.pid)
    try:
        assert "warning: --host 0.0.0.0 lets other machines reach the OpenAI API" in err.read_text()
        assert "node API" not in "".join(line for line in err.read_text().splitlines() if line.startswith("warning"))
        there = f"http://{address}:{port}"
        refused = http.get(there + "/nodes/status", timeout=5)
        assert refused.status == 403
        message = refused.json()["error"]["message"]
        assert message == ("the router's node API answers only this machine; start the router with an API key "
                           "(launch proxy start --api-key ...) to add nodes from other machines")
        added = http.post(there + "/nodes/add", {"url": "http://127.0.0.1:9", "status": {"models": [MODEL]}},
                          timeout=5)
        assert added.status == 403
        assert http.get(f"http://127.0.0.1:{port}/nodes/status", timeout=5).json() == {}  # this machine: yes
        assert http.get(there + "/health", timeout=5).status == 200  # the rest stays open
        assert_one_line_error(launch("proxy", "status", "--proxy", there), "refused to list its nodes",
                              "answers only this machine")
    finally:
        code = stop(proc)
    assert code == 0, err.read_text()[-2000:]
    assert left_running(kids) == []


# --- launch serve --replicas 2, the default router -------------------------------------------------------------


@pytest.mark.slow
def test_serve_replicas_2_registers_both_with_the_front_answers_and_sigterm_stops_every_process(model_dir, tmp_path):
    from tests.integration.scaleout.test_scale_serve import STANDIN_ENGINE, closed, start_serve
    from tests.integration.serve.test_serve import read_until

    port = free_ports(3)
    proc, err = start_serve(tmp_path, str(model_dir), "--factor", "2", "--backend", "pytorch", "--replicas", "2",
                            "--port", str(port), env={"LAUNCH_API_KEYS": KEY, "CUDA_VISIBLE_DEVICES": "0,1"})
    root = f"http://127.0.0.1:{port}"
    urls = [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"]
    kids: list[int] = []
    with killed_if_running(proc):
        ready = "".join(read_until(proc, "curl", timeout=240))
        kids = children_of(proc.pid)
        assert f"OpenAI API at {root}/v1 through vllm-router behind launch's front, 2 replica(s)" in ready, ready
        assert "it retries a failed request on another replica" in ready
        assert f"router log {tmp_path / 'cache' / 'runs' / f'proxy-{port}' / 'front.log'}" in ready
        # four processes, each its own group: the two stand-in engines, vllm-router and the front
        engines = [k for k in kids if str(STANDIN_ENGINE) in cmdline(k)]
        routers = [k for k in kids if k not in engines]
        assert len(engines) == 2 and len(routers) == 2, [cmdline(k) for k in kids]
        assert all(group_members(k) for k in kids)
        assert [k for k in routers if listens(k, port)] and "vllm::router" in [cmdline(k) for k in routers]
        assert not [k for k in kids if KEY in cmdline(k)]
        # both registered with the front (through its node API, with the key) and in vllm-router's own table
        assert {u: n.models for u, n in proxy_nodes(root, key=KEY).items()} == {u: ("tiny",) for u in urls}
        assert http.get(root + "/nodes/status", timeout=5).status == 401
        inner = inner_url_from_log(tmp_path / "cache" / "runs" / f"proxy-{port}" / "router.log")
        (vllm,) = [k for k in routers if cmdline(k) == "vllm::router"]
        assert listens(vllm, int(inner.rsplit(":", 1)[1]))
        assert router_workers(inner) == dict.fromkeys(urls, True)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
        assert http.post(root + "/v1/chat/completions", body, timeout=20).status == 401
        for _ in range(4):
            reply = http.post(root + "/v1/chat/completions", body, api_key=KEY, timeout=20)
            assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"], reply.body[:300]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert len(kids) == 4 and left_running(kids) == []
    assert all(closed(p) for p in (port, port + 1, port + 2))
    assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]


# --- without vllm-router ------------------------------------------------------------------------------------------


def test_vllm_router_is_found_beside_this_python_else_on_path_else_refused_in_one_line(tmp_path, monkeypatch):
    from launcher.scaleout.router import RouterMissing, vllm_router_path

    bare = tmp_path / "venv" / "bin"
    bare.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bare / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RouterMissing) as missing:
        vllm_router_path()
    message = str(missing.value)
    assert "\n" not in message and "vllm-router" in message and "--router lmdeploy" in message, message
    assert str(bare / "python") in message

    on_path = tmp_path / "elsewhere"
    on_path.mkdir()
    (on_path / "vllm-router").write_text("#!/bin/sh\n")
    (on_path / "vllm-router").chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path))
    assert vllm_router_path() == str(on_path / "vllm-router")
    (bare / "vllm-router").write_text("#!/bin/sh\n")
    (bare / "vllm-router").chmod(0o644)  # not executable: not it
    assert vllm_router_path() == str(on_path / "vllm-router")
    (bare / "vllm-router").chmod(0o755)
    assert vllm_router_path() == str(bare / "vllm-router")  # beside this Python first


def test_proxy_start_without_vllm_router_stops_in_one_line_before_writing(tmp_path, monkeypatch):
    bare = tmp_path / "venv" / "bin"
    bare.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bare / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run(["proxy", "start", "--port", str(free_port())])
    assert code != 0 and out == "" and err.count("\n") == 1, err
    assert err.startswith("launch: error: vllm-router, the default router, is not installed here") and \
        "--router lmdeploy" in err, err
    assert not (tmp_path / "cache").exists()


def test_routing_is_lmdeploys_and_router_is_one_of_two(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    for argv, needles in (
            (["--routing", "random"], ["--routing 'random'", "add --router lmdeploy"]),
            (["--router", "vllm", "--routing", "random"], ["--routing 'random'", "add --router lmdeploy"]),
            (["--router", "nginx"], ["--router 'nginx'", "vllm", "lmdeploy"]),
            (["--router", ""], ["--router"])):
        code, out, err = run(["proxy", "start", "--port", str(free_port()), *argv])
        assert (code, out, err.count("\n")) == (2, "", 1) and err.startswith("launch: error: "), (argv, err)
        assert all(needle in err for needle in needles), (argv, err)
    assert not (tmp_path / "cache").exists()


def test_plan_shows_vllm_routers_command_as_its_own_parser_reads_it(tmp_path, monkeypatch):
    from vllm_router.launch_router import parse_router_args

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, out, err = run(["plan", "internlm2_5-7b-chat", "--factor", "2", "--replicas", "2", "--gpu-memory", "80",
                          "--port", "9000", "--json"])
    assert code == 0, err
    data = json.loads(out)
    proxy = data["proxy"]
    assert (proxy["host"], proxy["port"], proxy["router"]) == ("127.0.0.1", 9000, "vllm")
    assert proxy["command"] == ["launch", "proxy", "start", "--host", "127.0.0.1", "--port", "9000"]
    argv = proxy["router_command"]
    assert argv[0] == "vllm-router" and proxy["router_command_line"] == " ".join(argv)
    chosen = [{"PORT": "20000", "PORT+1": "20001"}.get(arg, arg) for arg in argv[1:]]  # chosen at start
    args = parse_router_args(chosen)
    assert (args.host, args.port, args.prometheus_host, args.prometheus_port) == ("127.0.0.1", 20000, "127.0.0.1", 20001)
    assert (args.policy, args.health_check_interval_secs, args.request_timeout_secs) == ("power_of_two", 2, 1800)
    assert [c["role"] for c in data["commands"]] == ["proxy", "replica", "replica"]
    assert data["commands"][0]["command"] == proxy["command"]
    code, text, err = run(["plan", "internlm2_5-7b-chat", "--factor", "2", "--replicas", "2", "--gpu-memory", "80",
                           "--port", "9000"])
    assert code == 0, err
    assert ("serve runs launch's front (vllm-router behind it on loopback) on 127.0.0.1:9000 and 2 "
            "replica(s)") in text
    assert "lmdeploy serve proxy" not in text


@pytest.mark.slow
def test_power_of_two_spreads_the_load_and_no_placeholder_is_left(empty_router, replicas, launch):
    """The default policy routes by load: 48 chats, 12 at once, over 3 replicas, each takes a fair share
    (sticky_least_loaded, tried before, sent all of them to one); the two placeholders vllm-router needed to
    start are gone from its worker list."""
    from concurrent.futures import ThreadPoolExecutor

    root = empty_router["url"]
    urls = [replicas.start("--reply-seconds", "0.05", "--log-chats", key=None) for _ in range(3)]
    for url in urls:
        add_node(url, root)
    assert set(http.get(root + "/nodes/status", timeout=5).json()) == set(urls)  # no placeholder among them
    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(lambda _: try_chat(root), range(48)))
    counts = [(replicas.log_dir / f"replica-{u.rsplit(':', 1)[1]}.log").read_text().count("standin: chat start")
              for u in urls]
    assert sum(counts) == 48 and min(counts) >= 6, counts


@pytest.mark.slow
def test_the_first_node_api_call_waits_for_the_placeholders_to_go_instead_of_failing(tmp_path, replicas):
    """A caller that polls the node API instead of reading the ready line (a script, the fault bench) may
    reach the front before vllm-router has let its two start-up placeholders go: that call waits for it,
    and the replica it adds then answers (measured before: every request 503, the add refused)."""
    port = free_port()
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    env.pop("LAUNCH_API_KEYS", None)
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "proxy", "start", "--port", str(port)],
                                stdout=out, stderr=err, env=env, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        url = replicas.start(key=None)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the first moment the front's socket answers
            try:
                http.get(root + "/router", timeout=2)
                break
            except (http.Unreachable, http.DeadlineExceeded):
                time.sleep(0.02)
        _, new = add_node(url, root)
        assert new and set(proxy_nodes(root)) == {url}  # no placeholder listed
        assert try_chat(root)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "err").read_text()[-2000:]
