"""`launch proxy start --router lmdeploy | add | remove | status` with the REAL lmdeploy proxy on
127.0.0.1 and stand-in replicas (tests/support/standin_replica.py: the api_server's endpoints, no GPU
engine). These tests are lmdeploy's proxy's (its open node API, launch's watchdog, its routing);
the default router (vllm-router behind launch's front) has its own: tests/integration/scaleout/test_router.py.

One proxy (`launch proxy start --router lmdeploy`, a real subprocess, with an API key) serves the
module; each test starts with it emptied of nodes. The Ctrl-C tests start their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from launcher.engine.proxy_server import proxy_kwargs
from launcher.engine.routing import ROUTINGS, proxy_command
from launcher.net import http
from launcher.net.lmdeploy import check_health_all
from launcher.rules.checks import BadOption
from launcher.runtime.process import group_members as _group_members
from launcher.scaleout.nodes import (
    NodeNotHealthy,
    NodeNotRegistered,
    NodeUnauthorized,
    ProxyUnreachable,
    add_node,
    advertise_url,
    deregister,
    leave,
    node_url,
    proxy_nodes,
    remove_node,
)
from launcher.scaleout.state import FORMAT, STATE_NAME, started
from launcher.scaleout.status import proxy_status, render_status, taken_out
from tests.conftest import REPO, assert_one_line_error, free_port, killed_if_running
from tests.unit.plan.test_layout import lmdeploy_serve_parser

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

STANDIN = REPO / "tests" / "support" / "standin_replica.py"
KEY = "proxy-test-key-1"
MODEL = "standin-model"
READY_TIMEOUT_S = 180.0  # the proxy imports torch: 4-12 s here, more on a busy machine
REMOVAL_LIMIT_S = 10.0


# --- helpers -----------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def start_launch_proxy(tmp: Path, port: int, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=str(REPO), HOME=str(tmp),
               XDG_CACHE_HOME=str(tmp / "xdg-cache"))  # a module fixture: set up before the per-test HOME
    env.pop("LAUNCH_API_KEYS", None)
    out, err = tmp / "proxy.out", tmp / "proxy.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "proxy", "start", "--port", str(port), *extra],
                                stdout=o, stderr=e, env=env)
    ready = wait_for(lambda: "Proxy ready" in out.read_text() or proc.poll() is not None, READY_TIMEOUT_S, 0.2)
    if not ready or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"launch proxy start did not become ready: {err.read_text()[-2000:]}")
    return proc, out, err


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def children_of(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def chat(proxy: str, key: str | None = KEY, n: int = 1) -> list[http.Reply]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
    return [http.post(proxy + "/v1/chat/completions", body, api_key=key, timeout=20) for _ in range(n)]


def answered(reply: http.Reply) -> bool:
    """A real answer: lmdeploy's proxy reports a failed node as HTTP 200 with an error_code body."""
    if reply.status != 200:
        return False
    data = reply.json()
    return "error_code" not in data and data["choices"][0]["message"]["content"].startswith("stand-in reply")


def served_count(url: str, key: str | None = KEY) -> int:
    """Chats a stand-in answered, from its lmdeploy-style /metrics counter."""
    text = http.get(url + "/metrics", api_key=key, timeout=5).body.decode()
    match = re.search(r"^lmdeploy:request_success_total\{[^}]*\} ([0-9.]+)$", text, re.MULTILINE)
    assert match, text
    return int(float(match.group(1)))


class Replicas:
    """Stand-in replicas in real subprocesses on free loopback ports; all killed at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, *flags: str, key: str | None = KEY, port: int | None = None, wait: bool = True) -> str:
        port = port or free_port()
        argv = [sys.executable, str(STANDIN), "--port", str(port), "--model-name", MODEL, *flags]
        if key:
            argv += ["--api-keys", key]
        log = open(self.log_dir / f"replica-{port}.log", "ab")  # noqa: SIM115 - the child holds it
        url = f"http://127.0.0.1:{port}"
        self.procs[url] = subprocess.Popen(argv, stdout=log, stderr=log)
        log.close()
        if wait:
            assert wait_for(lambda: http.status_of(url + "/v1/models", timeout=1) is not None, 30), url
        return url

    def kill(self, url: str) -> None:
        self.procs[url].kill()
        self.procs[url].wait()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    port = free_port()
    proc, out, err = start_launch_proxy(tmp, port, "--router", "lmdeploy", "--api-key", KEY)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "proc": proc, "out": out, "err": err, "cache": tmp / "cache"}
    assert stop(proc) == 0, err.read_text()[-2000:]


@pytest.fixture
def empty_proxy(proxy):
    for url in proxy_nodes(proxy["url"]):
        deregister(proxy["url"], url)
    assert proxy_nodes(proxy["url"]) == {}
    return proxy


@pytest.fixture
def replicas(tmp_path):
    group = Replicas(tmp_path)
    yield group
    group.close()


# --- registration --------------------------------------------------------------------------------


def test_a_node_is_registered_only_after_its_health_answers(empty_proxy, replicas, launch):
    proxy = empty_proxy["url"]
    url = replicas.start("--unhealthy-seconds", "4")  # bound, /health 503 "initializing"
    result = launch("proxy", "add", url, "--proxy", proxy, "--api-key", KEY)
    assert_one_line_error(result, "is not healthy (HTTP 503)")
    assert proxy_nodes(proxy) == {}
    assert wait_for(lambda: http.status_of(url + "/health", timeout=1) == 200, 20)
    result = launch("proxy", "add", url + "/", "--proxy", proxy.replace("http://", ""), "--api-key", KEY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"added {url} ({MODEL})"
    # a trailing "/" would have registered a second node in lmdeploy; launch normalised it
    assert add_node(url + "/v1", proxy, KEY) == (proxy_nodes(proxy)[url], False)  # there already: not added again
    assert {u: n.models for u, n in proxy_nodes(proxy).items()} == {url: (MODEL,)}


def test_remove_and_status(empty_proxy, replicas, launch):
    proxy = empty_proxy["url"]
    a, b = replicas.start(), replicas.start()
    add_node(a, proxy, KEY)
    add_node(b, proxy, KEY)
    rows = proxy_status(proxy)
    assert [(r.node.url, r.node.models, r.health.ok) for r in rows] == [(u, (MODEL,), True) for u in sorted((a, b))]
    text = launch("proxy", "status", "--proxy", proxy)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"proxy {proxy}: 2 node(s), 2 healthy"
    assert re.search(rf"^{re.escape(a)}\s+{MODEL}\s+healthy\s+0$", text.stdout, re.MULTILINE)
    result = launch("proxy", "remove", b, "--proxy", proxy)
    assert result.returncode == 0 and result.stdout.strip() == f"removed {b}"
    data = json.loads(launch("proxy", "status", "--proxy", proxy, "--json",
                             env={"LAUNCH_CACHE_DIR": str(empty_proxy["cache"])}).stdout)
    assert data == {"proxy": proxy, "router": "lmdeploy's proxy",
                    "nodes": [{"url": a, "models": [MODEL], "unfinished": 0, "healthy": True, "health": "healthy"}],
                    "removed_by_watchdog": []}  # its watchdog's state found: a node removed by hand is not in it
    assert_one_line_error(launch("proxy", "remove", b, "--proxy", proxy), f"not a node of the proxy at {proxy}",
                          f"its nodes: {a}", code=2)
    time.sleep(5)  # two watchdog rounds: a node removed by the user is not put back
    assert list(proxy_nodes(proxy)) == [a]
    remove_node(a, proxy)
    assert "no nodes" in render_status(proxy, proxy_status(proxy))


def test_the_watchdog_keeps_a_node_registered_with_a_trailing_slash_once(empty_proxy, replicas):
    proxy = empty_proxy["url"]
    a, b = replicas.start(), replicas.start()
    add_node(a, proxy, KEY)
    for url in (a + "/", b + "/"):  # as lmdeploy's node API takes them from anyone: duplicates there
        assert http.post(proxy + "/nodes/add", {"url": url, "status": {"models": [MODEL]}}, timeout=5).ok
    assert len(proxy_nodes(proxy)) == 3
    assert wait_for(lambda: set(proxy_nodes(proxy)) == {a, b}, REMOVAL_LIMIT_S, 0.2), proxy_nodes(proxy)
    assert all(answered(r) for r in chat(proxy, n=4))


# --- done when: spread, kill -9, back again ------------------------------------------------------------


def test_done_when_requests_spread_and_a_killed_replica_is_taken_out_within_10s(empty_proxy, replicas, launch):
    proxy = empty_proxy["url"]
    a, b = replicas.start(), replicas.start()
    for url in (a, b):
        result = launch("proxy", "add", url, "--proxy", proxy, "--api-key", KEY)
        assert result.returncode == 0, result.stderr
    replies = chat(proxy, n=40)
    assert all(answered(r) for r in replies)
    counts = {url: served_count(url) for url in (a, b)}
    assert sum(counts.values()) == 40 and min(counts.values()) > 0, counts

    replicas.kill(b)  # kill -9
    killed_at, killed_wall = time.monotonic(), time.time()
    assert wait_for(lambda: b not in proxy_nodes(proxy), REMOVAL_LIMIT_S, 0.2), "not taken out within 10 s"
    assert time.monotonic() - killed_at <= REMOVAL_LIMIT_S
    replies = chat(proxy, n=20)
    assert all(answered(r) for r in replies), [r.body[:200] for r in replies if not answered(r)]
    assert served_count(a) == counts[a] + 20
    assert "took http://127.0.0.1:" in empty_proxy["err"].read_text()

    # `launch proxy status` shows the node the watchdog took out, when and why (the proxy forgot it)
    here = {"LAUNCH_CACHE_DIR": str(empty_proxy["cache"])}
    data = json.loads(launch("proxy", "status", "--proxy", proxy, "--json", env=here).stdout)
    assert [n["url"] for n in data["nodes"]] == [a]
    (out,) = data["removed_by_watchdog"]
    assert (out["url"], out["models"], out["reason"]) == (b, [MODEL], "/health connection refused (2 checks in a row)")
    when = datetime.strptime(out["removed_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert killed_wall - 1 <= when <= time.time()
    text = launch("proxy", "status", "--proxy", proxy, env=here).stdout
    assert text.splitlines()[0] == f"proxy {proxy}: 1 node(s), 1 healthy (1 taken out by launch's watchdog)"
    assert "taken out by launch's watchdog (added back when its /health answers 200):" in text
    assert re.search(rf"^{re.escape(b)}\s+{MODEL}\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, \d+ s ago\s+"
                     r"/health connection refused \(2 checks in a row\)$", text, re.MULTILINE), text
    # another launch cache (another user, or the proxy run elsewhere): no watchdog state, and said so
    other = json.loads(launch("proxy", "status", "--proxy", proxy, "--json").stdout)
    assert other["removed_by_watchdog"] is None and [n["url"] for n in other["nodes"]] == [a]

    # the replica comes back on the same address: the watchdog adds it back with its models
    replicas.start(port=int(b.rsplit(":", 1)[1]))
    assert wait_for(lambda: b in proxy_nodes(proxy), REMOVAL_LIMIT_S, 0.2), "not added back"
    assert proxy_nodes(proxy)[b].models == (MODEL,)
    assert all(answered(r) for r in chat(proxy, n=10))
    assert wait_for(lambda: json.loads(launch("proxy", "status", "--proxy", proxy, "--json", env=here).stdout)
                    ["removed_by_watchdog"] == [], 5)  # back: no longer listed as taken out


# --- a stuck replica ------------------------------------------------------------------------------------


def test_a_stuck_replica_does_not_block_the_others(empty_proxy, replicas, monkeypatch):
    proxy = empty_proxy["url"]
    a, stuck = replicas.start(), replicas.start()
    add_node(a, proxy, KEY)
    add_node(stuck, proxy, KEY)
    replicas.procs[stuck].send_signal(signal.SIGUSR1)  # its /health now accepts and never answers
    assert wait_for(lambda: http.status_of(stuck + "/health", timeout=1) is None, 10)  # once it took the signal
    taken_out_at = wait_for(lambda: stuck not in proxy_nodes(proxy) and time.monotonic(), REMOVAL_LIMIT_S + 1, 0.2)
    assert taken_out_at, "a stuck node was not taken out"
    assert a in proxy_nodes(proxy)  # the healthy one stayed all along
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(empty_proxy["cache"]))  # where the proxy's watchdog keeps its state
    (out,) = taken_out(proxy)
    assert (out.url, out.reason) == (stuck, "/health no answer within 2 s (2 checks in a row)")
    assert all(answered(r) for r in chat(proxy, n=10))
    assert served_count(a) == 10

    replicas.procs[stuck].send_signal(signal.SIGUSR1)  # unstuck: it answers again and is put back
    assert wait_for(lambda: stuck in proxy_nodes(proxy), REMOVAL_LIMIT_S, 0.2)


def test_health_checks_run_at_once_so_hanging_nodes_do_not_add_up(replicas):
    healthy = replicas.start()
    hanging = [replicas.start() for _ in range(4)]
    for url in hanging:
        replicas.procs[url].send_signal(signal.SIGUSR1)
    wait_for(lambda: http.status_of(hanging[-1] + "/health", timeout=0.5) is None, 5)
    started = time.monotonic()
    results = check_health_all([*hanging, healthy], timeout=1.5)
    elapsed = time.monotonic() - started
    assert results[healthy].ok and results[healthy].detail == "healthy"
    assert [results[u].detail for u in hanging] == ["no answer within 1.5 s"] * 4
    assert elapsed < 4 * 1.5  # one after the other they would take 6 s at least (at once: 1.5 s)


# --- API keys ----------------------------------------------------------------------------------------


def test_api_keys_are_enforced_at_the_proxy_and_the_replicas(empty_proxy, replicas, launch):
    proxy = empty_proxy["url"]
    url = replicas.start()
    assert_one_line_error(launch("proxy", "add", url, "--proxy", proxy), "needs an API key", code=2)
    assert_one_line_error(launch("proxy", "add", url, "--proxy", proxy, "--api-key", "wrong-key"),
                          "rejected the API key", code=2)
    with pytest.raises(NodeUnauthorized):
        add_node(url, proxy, None)
    assert proxy_nodes(proxy) == {}
    result = launch("proxy", "add", url, "--proxy", proxy, env={"LAUNCH_API_KEY": KEY})
    assert result.returncode == 0, result.stderr

    assert [r.status for r in chat(proxy, key=None)] == [401]
    assert [r.status for r in chat(proxy, key="wrong-key")] == [401]
    assert http.get(proxy + "/v1/models", timeout=5).status == 401
    assert all(answered(r) for r in chat(proxy, n=3))  # the proxy passes the client's key on
    assert http.post(url + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                     timeout=5).status == 401  # the replica itself wants the key too
    # lmdeploy's node API needs no key even with keys set: README says so (bind the proxy carefully)
    assert http.get(proxy + "/nodes/status", timeout=5).status == 200


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_changes_nothing(launch, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(launch("proxy", "start", "--router", "lmdeploy", "--routing", "min_observed_latency"),
                          "min_observed_latency is refused", "first registered node", code=2)
    assert_one_line_error(launch("proxy", "start", "--router", "lmdeploy", "--routing", "fastest"),
                          "not a routing strategy", code=2)
    assert_one_line_error(launch("proxy", "add", "http://0.0.0.0:23333", "--proxy", closed),
                          "0.0.0.0 is where a server listens", code=2)
    assert_one_line_error(launch("proxy", "add", "http://127.0.0.1:1/v2/x", "--proxy", closed), "root address")
    assert_one_line_error(launch("proxy", "status", "--proxy", closed), f"the proxy at {closed} does not answer")
    assert_one_line_error(launch("proxy", "status", "--proxy", "ftp://x"), "http(s) address")
    with pytest.raises(ProxyUnreachable):
        add_node("http://127.0.0.1:1", closed)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = launch("proxy", "start", "--port", str(port), env={"LAUNCH_CACHE_DIR": str(tmp_path / "cache")})
    assert_one_line_error(result, f"port {port} on 127.0.0.1 is already in use")
    assert not (tmp_path / "cache").exists()  # refused before the run directory was made


def test_urls_are_normalised():
    assert node_url("127.0.0.1:23333/") == "http://127.0.0.1:23333"
    assert node_url("http://10.0.0.5:23333/v1/") == "http://10.0.0.5:23333"
    assert node_url("HTTP://Host:80") == "http://host"
    for bad in ("http://0.0.0.0:1", "http://[::]:1", "http://u:p@h:1"):
        with pytest.raises(Exception) as err:
            node_url(bad)
        assert "p@" not in str(err.value)


def test_a_replica_advertises_a_url_the_proxy_can_reach_and_leaves_quietly(empty_proxy, replicas):
    assert advertise_url("127.0.0.1", 23333) == "http://127.0.0.1:23333"
    assert advertise_url("0.0.0.0", 23333, "http://10.0.0.5:23333/") == "http://10.0.0.5:23333"
    with pytest.raises(BadOption, match="--advertise-url"):
        advertise_url("0.0.0.0", 23333)
    proxy = empty_proxy["url"]
    url = replicas.start()
    add_node(advertise_url("127.0.0.1", int(url.rsplit(":", 1)[1])), proxy, KEY)
    assert leave(url, proxy) is True and proxy_nodes(proxy) == {}
    assert leave(url, proxy) is False  # not there any more: no error on a stop path
    assert leave(url, f"http://127.0.0.1:{free_port()}") is False  # proxy gone: no error either


def test_the_client_commands_import_nothing_heavy(proxy):
    from tests.integration.test_startup import BLOCKER, HEAVY

    for argv in (["proxy", "--help"], ["proxy", "status", "--proxy", proxy["url"], "--json"]):
        code = BLOCKER.format(heavy=HEAVY, argv=argv)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(re.search(r"MODULES=(\[[^\]]*\])", result.stderr).group(1)) == []


def test_a_node_that_is_not_healthy_is_not_added(empty_proxy):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(NodeNotHealthy, match="connection refused"):
        add_node(closed, empty_proxy["url"])
    with pytest.raises(NodeNotRegistered):
        remove_node(closed, empty_proxy["url"])


# --- the proxy process ------------------------------------------------------------------------------


def test_the_equivalent_command_is_lmdeploys_and_kwargs_are_its_flags():
    parser = lmdeploy_serve_parser()
    for routing in ROUTINGS:
        argv = proxy_command("127.0.0.1", 8000, routing)
        args = parser.parse_args(argv[2:])
        assert (args.server_name, args.server_port, args.routing_strategy) == ("127.0.0.1", 8000, routing)
        assert args.disable_cache_status is True
        kwargs = proxy_kwargs({"server_name": "127.0.0.1", "server_port": 8000, "routing_strategy": routing,
                               "api_keys": ["k"]})
        assert set(kwargs) <= set(vars(args))  # lmdeploy's CLI calls proxy(**vars(args))
        assert kwargs["api_keys"] == ["k"] and kwargs["disable_cache_status"] is True


def test_ctrl_c_stops_the_proxy_and_leaves_no_process(tmp_path):
    import lmdeploy

    cache_file = Path(lmdeploy.__file__).parent / "serve" / "proxy" / "proxy_config.json"
    existed = cache_file.exists()
    port = free_port()
    proc, out, err = start_launch_proxy(tmp_path, port, "--router", "lmdeploy", "--api-key", KEY)
    try:
        lines = out.read_text().splitlines()
        assert lines[0].startswith(f"Proxy ready: http://127.0.0.1:{port}")
        assert "routing min_expected_latency" in lines[0]  # the default, without --routing
        run_dir = tmp_path / "cache" / "runs" / f"proxy-{port}"
        assert f"log {run_dir / 'proxy.log'}" in out.read_text()
        # the spec (with the key) went through a pipe: no file of launch's holds the key, even while it runs
        files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert files and not [p for p in files if KEY.encode() in p.read_bytes()]
        assert (tmp_path / "cache" / "runs" / "ports" / f"{port}.lock").read_text().strip() == str(proc.pid)
        state = run_dir / STATE_NAME  # the watchdog's record, for `launch proxy status`: nothing taken out yet
        assert state.stat().st_mode & 0o777 == 0o600
        assert json.loads(state.read_text()) == {"format": FORMAT, "port": port, "pid": proc.pid,
                                                 "started": started(proc.pid), "removed": []}
        (child,) = children_of(proc.pid)
        assert KEY not in (Path(f"/proc/{child}/cmdline").read_bytes().decode())  # keys never on argv
        assert _group_members(child)  # the proxy runs in its own process group
        assert http.get(f"http://127.0.0.1:{port}/nodes/status", timeout=5).json() == {}
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0, err.read_text()[-2000:]
    assert _group_members(child) == []
    assert not state.exists()  # removed by the process that wrote it
    assert sorted(p.name for p in run_dir.iterdir()) == ["proxy.log"]
    assert http.status_of(f"http://127.0.0.1:{port}/nodes/status", timeout=1) is None
    assert cache_file.exists() == existed  # nothing written into lmdeploy's installation


@pytest.mark.parametrize("router, processes", [([], 2), (["--router", "lmdeploy"], 1)], ids=["default", "lmdeploy"])
def test_ctrl_c_while_the_proxy_starts_leaves_no_process(tmp_path, router, processes):
    """The default router is two processes (vllm-router, which renames itself ``vllm::router``, and
    launch's front), lmdeploy's one: each in its own process group, every group empty after Ctrl-C."""
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "proxy", "start", "--port", str(free_port()), *router],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    with killed_if_running(proc):
        kids = wait_for(lambda: len(children_of(proc.pid)) >= processes and children_of(proc.pid), 30, 0.05)
        assert kids and len(kids) == processes, f"the router's processes were not started: {kids}"
        assert all(_group_members(kid) for kid in kids)  # each leads a process group of its own
        if router:
            time.sleep(0.5)  # lmdeploy's proxy is importing lmdeploy: not listening yet (vllm-router: ready in ~1 s)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"Proxy ready" not in out
    assert [kid for kid in kids if _group_members(kid)] == []


# --- the watchdog's state file: read only when it can be the queried proxy's ------------------------


def test_watchdog_state_is_read_only_for_a_live_writer_of_that_port_on_this_machine(tmp_path, monkeypatch):
    from launcher.scaleout.state import (
        Removed,
        clear_state,
        is_this_machine,
        read_state,
        state_path,
        write_state,
    )

    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    port = free_port()
    gone = Removed("http://127.0.0.1:1", ("m",), 1_700_000_000.0, "/health connection refused (2 checks in a row)")
    assert read_state("127.0.0.1", port) is None  # no file
    path = write_state(port, [gone])
    assert path == state_path(port) and path.stat().st_mode & 0o777 == 0o600
    assert read_state("127.0.0.1", port) == (gone,) and gone.when == "2023-11-14T22:13:20Z"
    assert read_state("localhost", port) == (gone,)
    assert is_this_machine("127.0.0.1") and not is_this_machine("192.0.2.1")  # TEST-NET-1: nobody's address
    assert read_state("192.0.2.1", port) is None  # a proxy on another machine: not this file
    data = json.loads(path.read_text())
    for bad in ({**data, "port": port + 1}, {**data, "format": FORMAT - 1}, {**data, "removed": [{"url": "x"}]}, []):
        path.write_text(json.dumps(bad))
        assert read_state("127.0.0.1", port) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    path.write_text(json.dumps({**data, "pid": int(dead.stdout)}))  # left by a run that was killed
    assert read_state("127.0.0.1", port) is None
    assert data["started"] is not None  # this process's start time, from psutil
    path.write_text(json.dumps({**data, "started": data["started"] + 0.01}))  # the same start, read again
    assert read_state("127.0.0.1", port) == (gone,)
    for other in (data["started"] - 1, data["started"] + 0.6, str(data["started"]), True):  # its pid, another start
        path.write_text(json.dumps({**data, "started": other}))
        assert read_state("127.0.0.1", port) is None
    clear_state(port)
    assert path.exists()
    clear_state(port)
    assert path.exists()  # not this process's file: left alone
    write_state(port, [])
    assert read_state("127.0.0.1", port) == ()
    clear_state(port)
    assert not path.exists()


def test_a_stopped_watchdog_records_nothing_more(tmp_path):
    """Once ``stop()`` returned, a round still under way cannot write its record again after the
    owner cleared it (the owner deletes the state file right after stop())."""
    from launcher.scaleout.watchdog import Watchdog, _Member

    heard: list[list] = []
    dog = Watchdog("http://127.0.0.1:9", on_change=heard.append)
    dog.members["http://127.0.0.1:10"] = _Member(("m",), failures=2, removed=True, removed_at=1.0, reason="gone")
    dog._tell()
    assert [r.url for r in heard[-1]] == ["http://127.0.0.1:10"]
    dog.members["http://127.0.0.1:11"] = _Member(("m",), removed=True, removed_at=2.0, reason="stuck")
    dog.stop()
    dog._tell()  # what a round finishing after stop() would do
    assert len(heard) == 1
