"""Scale-out, serve and address edges of the second hostile pass (issue 17), as classes:

- one port, one launch run: two `launch proxy start` at once on one port (a real race of real
  processes), and readiness answered by another program;
- one server, one node: a replica under several spellings of its address (property-based, and
  against the real lmdeploy proxy);
- lmdeploy's routing strategies as its own code runs them, and the help that describes them;
- what lmdeploy's open node API lets anyone register (malformed URLs, passwords): no traceback, no
  secret printed or recorded;
- one warning rule for a bind beyond loopback; `serve --dry-run` exits as `serve` would;
- one host rule, one port rule for replicas, one CUDA_VISIBLE_DEVICES reader (property-based).

The proxy is lmdeploy's own (`launch proxy start --router lmdeploy`, real subprocesses on 127.0.0.1:
these edges are its open node API's, its watchdog's and its routing's); replicas are stand-ins
(tests/support/standin_replica.py: the api_server's endpoints, no GPU engine).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.net import http
from launcher.rules.checks import BadOption
from launcher.runtime.address import check_host, exposure_warnings, ip_literal
from launcher.runtime.gpu import visible
from launcher.runtime.ports import PortBusy, PortClaim
from launcher.runtime.process import ServerProcess
from launcher.runtime.supervise import ServerStartTimeout, Supervised, Supervisor
from launcher.scaleout.nodes import node_url, proxy_nodes, same_node
from tests.conftest import LLAMA, REPO, assert_one_line_error, free_port, killed_if_running
from tests.integration.scaleout import test_proxy
from tests.integration.scaleout.test_proxy import MODEL, start_launch_proxy, stop, wait_for
from tests.integration.serve.test_serve import launch_with_gpu
from tests.support.servers import JSONHandler, serving

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

KEY = "edge-test-key-1"
PASSWORD = "s3cret-pw"
PLAN_MODEL = ("internlm2_5-7b-chat", "--factor", "2", "--gpu-memory", "80")


# --- the module's proxy: one real `launch proxy start`, emptied before each test -----------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    port = free_port()
    proc, _out, err = start_launch_proxy(tmp, port, "--router", "lmdeploy", "--api-key", KEY)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "proc": proc, "err": err, "cache": tmp / "cache"}
    assert stop(proc) == 0, err.read_text()[-2000:]


# test_proxy's fixtures over this module's proxy: the proxy emptied of nodes; stand-in replicas, killed after
empty_proxy = test_proxy.empty_proxy
replicas = test_proxy.replicas


def post_node(proxy: str, url: str) -> None:
    """Register ``url`` as anyone can, through lmdeploy's open node API (models filled: no probe)."""
    assert http.post(proxy + "/nodes/add", {"url": url, "status": {"models": [MODEL]}}, timeout=5).ok


# --- one port, one launch run ----------------------------------------------------------------------


def test_two_proxy_starts_on_one_port_one_serves_as_it_said_the_other_refuses_in_one_line(tmp_path):
    """Two real `launch proxy start` on one port at once, one with a key on 127.0.0.1 and one
    without on 0.0.0.0, sharing one launch cache: exactly one serves, with its own settings; the
    other exits non-zero with one line and announced nothing; the survivor's record is intact."""
    port = free_port()
    cache = tmp_path / "cache"
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    env.pop("LAUNCH_API_KEYS", None)
    flags = {"keyed": ["--api-key", KEY], "open": ["--host", "0.0.0.0"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "launcher", "proxy", "start", "--port", str(port),
                                     "--router", "lmdeploy", *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, extra in flags.items()}
    try:
        assert wait_for(lambda: any(p.poll() is not None for p in procs.values()), 120, 0.1), "neither was refused"
        (loser,) = [name for name, p in procs.items() if p.poll() is not None]
        (winner,) = [name for name in procs if name != loser]
        out, err = procs[loser].communicate(timeout=10)
        assert procs[loser].returncode != 0 and out == "", out  # never said "Proxy ready"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("launch: error: ") and "Traceback" not in err, err
        assert f"port {port}" in lines[0] and "already in use" in lines[0]
        root = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: http.status_of(root + "/nodes/status", timeout=1) == 200, 120, 0.2)
        # the survivor serves with its own settings: a key is required exactly when it was given one
        assert http.get(root + "/v1/models", timeout=5).status == (401 if winner == "keyed" else 200)
        record = cache / "runs" / f"proxy-{port}" / "watchdog.json"
        assert wait_for(record.exists, 30, 0.1), "the survivor keeps no record"
        state = json.loads(record.read_text())
        assert state["pid"] == procs[winner].pid and state["port"] == port
        assert not [f for f in cache.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    finally:
        for proc in procs.values():
            stop(proc)
    assert procs[winner].returncode == 0


def test_a_port_claim_is_one_runs_until_it_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    port = free_port()
    other = ("import sys; from launcher.runtime.ports import PortClaim\n"
             f"try:\n    PortClaim('127.0.0.1', [{port}]).__enter__()\nexcept Exception as err:\n    print(err); sys.exit(7)")

    def claim_elsewhere() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, cwd=REPO, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)

    with PortClaim("127.0.0.1", [port]):
        refused = claim_elsewhere()
        assert refused.returncode == 7 and f"(pid {os.getpid()})" in refused.stdout, refused
        with pytest.raises(PortBusy):  # a second claim in this process too (its own open file)
            PortClaim("127.0.0.1", [free_port(), port]).__enter__()
    assert claim_elsewhere().returncode == 0  # released with the first claim's end


def test_an_answer_from_another_program_on_the_port_is_not_ready(tmp_path):
    """The server launch started has not bound its port; another program answers there: not ready
    (before: launch announced the other program's server as its own)."""

    class Healthy(JSONHandler):
        def do_GET(self) -> None:
            self.send_json(200, {})

    with serving(Healthy) as other:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        server = ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "s.log")
        with pytest.raises(ServerStartTimeout), Supervisor([Supervised(server, url + "/health", 2.0)],
                                                           progress_stream=io.StringIO()) as run:
            run.start()
            assert server.listens_on(other.server_address[1]) is False
            run.wait_ready()
    assert server.poll() is not None


LISTEN = ("import socket, time; s = socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET); "
          "s.bind(({host!r}, {port})); s.listen(); time.sleep(60)")


@pytest.mark.parametrize("where", ["itself", "its worker", "a worker in a session of its own"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_servers_own_socket_is_found_wherever_in_its_tree(tmp_path, where, host):
    port = free_port()
    code = LISTEN.format(host=host, port=port)
    if where != "itself":
        detach = where != "its worker"
        code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {code!r}], "
                f"start_new_session={detach}); time.sleep(60)")
    with ServerProcess([sys.executable, "-c", code], log_path=tmp_path / "own.log", cwd=tmp_path) as own:
        assert wait_for(lambda: own.listens_on(port), 30, 0.1)
        assert own.listens_on(free_port()) is False  # another port: not this server's
    assert own.poll() is not None and not own.listens_on(port)


# --- one server, one node --------------------------------------------------------------------------


def _part(value: int, style: str) -> str:
    return {"dec": str(value), "oct": "0" + format(value, "o"), "hex": "0x" + format(value, "x"),
            "HEX": "0X" + format(value, "X")}[style]


@st.composite
def ipv4_spellings(draw) -> tuple[str, str]:
    """(an IPv4 address, a spelling of it the C library reads: 1 to 4 parts, each decimal, octal
    or hex, the last filling the rest; or IPv4-mapped IPv6)."""
    value = draw(st.integers(0, 2**32 - 1))
    octets = value.to_bytes(4, "big")
    dotted = ".".join(map(str, octets))
    form = draw(st.sampled_from(["1", "2", "3", "4", "mapped", "mapped-hex"]))
    styles = st.sampled_from(["dec", "oct", "hex", "HEX"])
    if form == "mapped":
        return dotted, f"[::ffff:{dotted}]"
    if form == "mapped-hex":
        return dotted, f"[::FFFF:{octets[0] * 256 + octets[1]:x}:{octets[2] * 256 + octets[3]:x}]"
    n = int(form)
    head = [_part(octets[i], draw(styles)) for i in range(n - 1)]
    tail = int.from_bytes(octets[n - 1:], "big")
    return dotted, ".".join([*head, _part(tail, draw(styles))])


@settings(max_examples=300, deadline=None)
@given(ipv4_spellings(), st.integers(1, 65535), st.sampled_from(["", "/", "/v1", "/v1/"]),
       st.sampled_from(["http", "HTTP", "Http"]))
def test_every_spelling_of_a_node_is_one_url(spelled, port, path, scheme):
    dotted, host = spelled
    if dotted == "0.0.0.0":  # every spelling of the wildcard is refused: no node listens at "any address"
        with pytest.raises(BadOption, match="where a server listens"):
            node_url(f"{scheme}://{host}:{port}{path}")
        return
    expected = f"http://{dotted}" + ("" if port == 80 else f":{port}")
    assert node_url(f"{scheme}://{host}:{port}{path}") == expected
    assert same_node(f"http://{host}:{port}", [f"http://{dotted}:{port}"]) == f"http://{dotted}:{port}"
    assert same_node(f"http://{host}:{port}", [f"http://{dotted}:{port % 65535 + 1}"]) is None  # other port


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=4, max_size=4))
def test_a_dotted_quad_is_an_address_only_when_each_number_fits(numbers):
    text = ".".join(map(str, numbers))
    if all(n <= 255 for n in numbers):
        assert check_host(text) == text
    else:
        with pytest.raises(BadOption, match="is not an IP address"):
            check_host(text)
        with pytest.raises(BadOption, match="is not an IP address"):
            node_url(f"http://{text}:1")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=0, max_size=40))
def test_a_host_the_rule_takes_is_one_the_c_library_reads_or_a_host_name(text):
    """Whatever ``check_host`` returns either is a numeric literal the C library reads, or a name
    of letters, digits, '-', '_' and '.'; everything else is refused with BadOption (no other error)."""
    try:
        host = check_host(text)
    except BadOption as err:
        assert "\n" not in str(err)
        return
    if ip_literal(host) is None:
        assert host and all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in host)
        assert not host.split(".")[-1].isdigit()
    else:
        assert check_host(host) == host  # canonical: a fixed point


def test_proxy_add_under_every_spelling_registers_one_node(empty_proxy, replicas, launch):
    proxy = empty_proxy["url"]
    url = replicas.start(key=KEY)
    port = url.rsplit(":", 1)[1]
    first = launch("proxy", "add", url, "--proxy", proxy, "--api-key", KEY)
    assert first.returncode == 0 and first.stdout.strip() == f"added {url} ({MODEL})", first.stderr
    for host in ("localhost", "LOCALHOST.", "127.1", "2130706433", "[::ffff:127.0.0.1]", "0x7f.0.0.1", "0177.0.0.1",
                 "127.000.000.001"):
        again = launch("proxy", "add", f"http://{host}:{port}/", "--proxy", proxy, "--api-key", KEY)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"already registered as {url} ({MODEL}): not added twice", again.stdout
    assert list(proxy_nodes(proxy)) == [url]
    removed = launch("proxy", "remove", f"http://localhost:{port}", "--proxy", proxy)
    assert removed.returncode == 0 and removed.stdout.strip() == f"removed {url}"
    assert proxy_nodes(proxy) == {}


def test_the_watchdog_keeps_one_entry_for_one_server_registered_under_several_spellings(empty_proxy, replicas):
    proxy = empty_proxy["url"]
    url = replicas.start(key=KEY)
    port = url.rsplit(":", 1)[1]
    for host in ("2130706433", "localhost", "127.1", "[::ffff:127.0.0.1]"):  # as anyone may, through the node API
        post_node(proxy, f"http://{host}:{port}")
    assert len(proxy_nodes(proxy)) == 4
    assert wait_for(lambda: len(proxy_nodes(proxy)) == 1, 10, 0.2), proxy_nodes(proxy)
    (kept,) = proxy_nodes(proxy)
    assert same_node(kept, [url]) == url


# --- what lmdeploy's open node API lets anyone register ------------------------------------------


def test_malformed_node_urls_are_refused_at_the_door_in_one_line_and_no_traceback(empty_proxy):
    """Refused by the proxy process before lmdeploy stores them (the watchdog's taking out of such
    entries found all the same: tests/unit/scaleout/test_node_door.py)."""
    proxy, err = empty_proxy["url"], empty_proxy["err"]
    before = len(err.read_text().splitlines())
    bad = ["not a url", "ftp://127.0.0.1:21", "http://127.0.0.1:99999", f"http://user:{PASSWORD}@h:99999",
           "http://127.0.0.1:0"]
    for url in bad:
        reply = http.post(proxy + "/nodes/add", {"url": url, "status": {"models": [MODEL]}}, timeout=5)
        assert reply.status == 400 and reply.detail().startswith("launch's proxy takes no such node: "), reply
        assert PASSWORD not in reply.body.decode() and reply.detail().isprintable()
        assert proxy_nodes(proxy) == {}
    time.sleep(2 * 2.0)  # two watchdog rounds: nothing to say
    new = err.read_text().splitlines()[before:]
    assert new == [], new


@pytest.mark.parametrize("url, why", [
    ("not a url", "no http://"), ("127.0.0.1:5", "no http://"), ("ftp://h:1", "http(s) address"),
    ("http://h:99999", "port"), ("http://h:0", "port"), ("http://[::1", "port"), ("http://256.1.1.1:5", "IP address"),
    ("http://a b:5", "host name"), ("http://", "http(s) address"), ("gopher://x", "http(s) address"),
])
def test_what_the_watchdog_takes_out_at_once(url, why):
    from launcher.engine.proxy_server import node_problem

    assert why in node_problem(url)
    for fine in ("http://127.0.0.1:5", "https://node-1.cluster:443", f"http://u:{PASSWORD}@h:1", "http://[::1]:5/"):
        assert node_problem(fine) is None


def test_a_password_in_a_node_url_is_never_printed_or_recorded(empty_proxy, replicas, launch):
    proxy, err = empty_proxy["url"], empty_proxy["err"]
    url = replicas.start(key=KEY)
    secret = url.replace("http://", f"http://user:{PASSWORD}@")
    post_node(proxy, secret)
    listed = launch("proxy", "status", "--proxy", proxy, env={"LAUNCH_CACHE_DIR": str(empty_proxy["cache"])})
    assert listed.returncode == 0 and url in listed.stdout and PASSWORD not in listed.stdout
    replicas.kill(url)
    state = empty_proxy["cache"] / "runs" / f"proxy-{empty_proxy['port']}" / "watchdog.json"
    assert wait_for(lambda: secret not in proxy_nodes(proxy), 10, 0.2), "not taken out"
    assert wait_for(lambda: url in state.read_text(), 5, 0.1)
    assert PASSWORD not in state.read_text() and PASSWORD not in err.read_text()
    data = json.loads(launch("proxy", "status", "--proxy", proxy, "--json",
                             env={"LAUNCH_CACHE_DIR": str(empty_proxy["cache"])}).stdout)
    assert url in [r["url"] for r in data["removed_by_watchdog"]] and PASSWORD not in json.dumps(data)
    assert f"took {url} out of the proxy" in err.read_text()


# --- routing: what lmdeploy's strategies do ---------------------------------------------------------


def test_lmdeploys_routing_code_min_expected_latency_picks_the_least_busy_random_ignores_load():
    """lmdeploy's own NodeManager.get_node_url, nodes registered as launch registers them (no
    speed): min_expected_latency always takes the node with the fewest requests in flight; random
    takes each node about equally often whatever its load."""
    from lmdeploy.serve.proxy.proxy import NodeManager, Status

    picks: dict[str, Counter] = {}
    for routing in ("min_expected_latency", "random"):
        manager = NodeManager(routing_strategy=routing, cache_status=False)
        for url, busy in (("http://a:1", 0), ("http://b:1", 5), ("http://c:1", 9)):
            manager.nodes[url] = Status(models=["m"], unfinished=busy)
        picks[routing] = Counter(manager.get_node_url("m") for _ in range(600))
    assert picks["min_expected_latency"] == Counter({"http://a:1": 600})
    assert set(picks["random"]) == {"http://a:1", "http://b:1", "http://c:1"}
    assert all(120 <= n <= 280 for n in picks["random"].values()), picks["random"]  # 200 expected each


def test_min_expected_latency_sends_more_to_faster_replicas_through_the_real_proxy(empty_proxy, replicas):
    proxy = empty_proxy["url"]
    delays = {"fast": "0.02", "mid": "0.05", "slow": "0.2"}
    urls = {name: replicas.start("--reply-delay", delay, key=KEY) for name, delay in delays.items()}
    for url in urls.values():
        post_node(proxy, url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    served: list[int] = []

    def client() -> None:
        for _ in range(15):
            served.append(http.post(proxy + "/v1/chat/completions", body, api_key=KEY, timeout=30).status)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert served == [200] * 120
    from tests.integration.scaleout.test_proxy import served_count

    counts = {name: served_count(url, KEY) for name, url in urls.items()}
    assert sum(counts.values()) == 120
    assert counts["fast"] > counts["mid"] > counts["slow"] and counts["fast"] >= 2 * counts["slow"], counts


def test_the_routing_help_says_what_the_strategies_do(launch):
    help_text = " ".join(launch("proxy", "start", "--help").stdout.split())
    assert "min_expected_latency sends each request to the replica with the fewest in flight" in help_text
    assert "random picks one uniformly, whatever its load" in help_text
    refusal = launch("proxy", "start", "--router", "lmdeploy", "--routing", "min_observed_latency")
    assert_one_line_error(refusal, "first registered node", "faster nodes get more", "random: uniform", code=2)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "spreads evenly" not in readme and "weighs by speed" not in readme


# --- one warning rule --------------------------------------------------------------------------------


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: --host")]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "gpu-box"])
def test_serve_its_dry_run_its_replicas_and_proxy_start_warn_by_one_rule(launch, tmp_path, host):
    expected = ["warning: " + line for line in exposure_warnings(host, 8000, False)]
    proxied = ["warning: " + line for line in exposure_warnings(host, 8000, False, node_api=True)]
    assert len(expected) == 1 and len(proxied) == 2
    # a host that is not this machine's: the dry run refuses it in one line, as serve does (it binds nothing)
    here = host in ("0.0.0.0", "::")
    dry = launch("serve", *PLAN_MODEL, "--host", host, "--port", "8000", "--dry-run")
    if not here:
        assert_one_line_error(dry, f"--host '{host}': ", code=2)
        return
    assert dry.returncode == 0 and warnings_in(dry.stderr) == expected, dry.stderr
    dry_json = launch("serve", *PLAN_MODEL, "--host", host, "--port", "8000", "--dry-run", "--json")
    assert json.loads(dry_json.stdout)["warnings"][-1] == expected[0].removeprefix("warning: ")
    lmdeploy = ("--replicas", "2", "--router", "lmdeploy")  # lmdeploy's proxy: its node API takes no key
    dry = launch("serve", *PLAN_MODEL, "--host", host, "--port", "8000", "--dry-run", *lmdeploy,
                 env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert dry.returncode == 0 and warnings_in(dry.stderr) == proxied, dry.stderr
    keyed = launch("serve", *PLAN_MODEL, "--host", host, "--port", "8000", "--dry-run", *lmdeploy,
                   env={"CUDA_VISIBLE_DEVICES": "0,1", "LAUNCH_API_KEYS": KEY})
    assert warnings_in(keyed.stderr) == proxied[1:]  # a key closes the OpenAI API, not the node API
    # the default router's node API takes a key, or answers this machine only: no line about it
    dry = launch("serve", *PLAN_MODEL, "--host", host, "--port", "8000", "--dry-run", "--replicas", "2",
                 env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert dry.returncode == 0 and warnings_in(dry.stderr) == expected, dry.stderr
    if host in ("0.0.0.0", "::"):  # a proxy that can bind here: it warns before it starts (then times out)
        port = free_port()
        started = launch("proxy", "start", "--host", host, "--port", str(port), "--start-timeout", "0.1",
                         "--router", "lmdeploy", env={"LAUNCH_CACHE_DIR": str(tmp_path / "cache")})
        assert started.returncode != 0 and "Proxy ready" not in started.stdout
        assert warnings_in(started.stderr) == ["warning: " + line
                                               for line in exposure_warnings(host, port, False, node_api=True)]
        started = launch("proxy", "start", "--host", host, "--port", str(port), "--start-timeout", "0.1",
                         env={"LAUNCH_CACHE_DIR": str(tmp_path / "cache")})  # the default router
        assert started.returncode != 0 and "Proxy ready" not in started.stdout
        assert warnings_in(started.stderr) == ["warning: " + line for line in exposure_warnings(host, port, False)]


def test_serve_warns_by_the_same_rule_before_it_starts(model_dir, tmp_path):
    result = launch_with_gpu("serve", str(model_dir), "--factor", "2", "--backend", "pytorch", "--host", "0.0.0.0",
                             "--port", str(free_port()), "--health-timeout", "0.1",
                             env={"LAUNCH_CACHE_DIR": str(tmp_path / "cache")})
    port = result.args[result.args.index("--port") + 1]
    assert warnings_in(result.stderr) == ["warning: " + line for line in exposure_warnings("0.0.0.0", port, False)]


# --- serve --dry-run exits as serve would -----------------------------------------------------------


def mistral_dir(tmp_path: Path) -> Path:
    model = tmp_path / "mistral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA, "architectures": ["MistralForCausalLM"],
                                                   "model_type": "mistral"}))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    return model


@pytest.mark.parametrize("case", ["no session fits", "turbomind cannot take it", "more tp than GPUs"])
def test_a_dry_run_shows_what_serve_refuses_and_exits_as_serve(model_dir, tmp_path, case):
    args = {"no session fits": ["internlm2_5-7b-chat", "--factor", "2", "--gpu-memory", "0.001"],
            "turbomind cannot take it": [str(mistral_dir(tmp_path)), "--factor", "2", "--backend", "turbomind",
                                         "--gpu-memory", "80"],
            "more tp than GPUs": [str(model_dir), "--factor", "2", "--backend", "pytorch", "--gpu-memory", "80",
                                  "--tp", "2", "--replicas", "2"]}[case]
    env = {"LAUNCH_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "0,1,2"}
    served = launch_with_gpu("serve", *args, "--port", str(free_port()), env=env)
    dry = launch_with_gpu("serve", *args, "--dry-run", env=env)
    dry_json = launch_with_gpu("serve", *args, "--dry-run", "--json", env=env)
    assert served.returncode != 0 and dry.returncode == served.returncode == dry_json.returncode
    refusal = served.stderr.strip().splitlines()[-1]
    assert refusal.startswith("launch: error: ") and dry.stderr.strip().splitlines()[-1] == refusal
    if case != "more tp than GPUs":  # a layout refusal comes before any plan is shown
        assert "engine call" in dry.stdout and f"serve would refuse this: {refusal[15:]}" in dry.stdout
        assert json.loads(dry_json.stdout)["refused"]["message"] == refusal[15:]
    assert not (tmp_path / "cache").exists()


# --- one host rule, one port rule for replicas -------------------------------------------------------


@pytest.mark.parametrize("host", ["256.1.1.1", "1.2.3.4.5", "08.1.1.1", "0x100.0.0.1", "a..b", "-x", "x" * 64,
                                  "4294967296", "::g", "1:2", "host name", "[10.0.0.1]", "localhost:8000"])
def test_a_host_that_is_no_address_and_no_name_is_refused_everywhere(launch, host):
    assert_one_line_error(launch("serve", *PLAN_MODEL, "--host", host, "--dry-run"), "--host", code=2)
    assert_one_line_error(launch("plan", *PLAN_MODEL, "--host", host), "--host", code=2)
    assert_one_line_error(launch("proxy", "start", "--host", host), "--host", code=2)
    bracketed = f"[{host}]" if ":" in host else host
    assert_one_line_error(launch("proxy", "add", f"http://{bracketed}:1", "--proxy", "http://127.0.0.1:9"), code=2)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 256), st.integers(0, 300))
def test_replica_ports_past_65535_name_the_port_given(count, below):
    from launcher.plan.build import PlanRequest, build_plan
    from launcher.plan.layout import replicas_for_plan

    port = 65535 - count + 1 + below % count  # the first replica fits, the last does not
    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat", factor="2", gpu_memory_gib=80, port=port))
    with pytest.raises(BadOption) as err:
        replicas_for_plan(plan, count, environ={})
    assert err.value.option == "--port" and err.value.value == str(port)
    assert f"give --port {65535 - count} or lower" in str(err.value) and "65536" not in err.value.value


def test_plan_replicas_on_the_last_port_names_the_flag_and_value_given(launch):
    result = launch("plan", *PLAN_MODEL, "--replicas", "2", "--port", "65535")
    assert_one_line_error(result, "--port '65535'", "give --port 65533 or lower", code=2)
    fits = launch("plan", *PLAN_MODEL, "--replicas", "2", "--port", "65533")
    assert fits.returncode == 0 and "http://127.0.0.1:65535" in fits.stdout


# --- one CUDA_VISIBLE_DEVICES reader ------------------------------------------------------------------

ENTRY = st.one_of(
    st.integers(0, 9).map(str),  # an index (valid below the count)
    st.integers(0, 9).map(lambda i: "0" + str(i)),  # leading zero: the same index
    st.sampled_from(["-1", "junk", "", " ", "0x1", "1.0", "٣", "GPU", "MIG"]),  # not an id: CUDA stops
    st.sampled_from(["GPU-8a4c1f2e-0000", "GPU-8A4C1F2E-0000", "GPU-77", "MIG-1b2c/1/0", "MIG-GPU-aa/0/0"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ENTRY, max_size=8), st.one_of(st.none(), st.integers(1, 8)))
def test_cuda_visible_devices_is_read_as_cuda_reads_it(entries, count):
    value = ",".join(entries)

    def valid(entry: str) -> bool:
        text = entry.strip()
        if text.isascii() and text.isdigit():
            return count is None or int(text) < count
        return text.startswith(("GPU-", "MIG-"))

    prefix = []
    for entry in value.split(","):
        if not valid(entry):
            break
        prefix.append(entry.strip())
    keys = [str(int(e)) if e.isdigit() else e.lower() for e in prefix]
    if len(set(keys)) < len(keys):
        with pytest.raises(BadOption) as err:
            visible({"CUDA_VISIBLE_DEVICES": value}, count)
        assert err.value.option == "CUDA_VISIBLE_DEVICES" and "twice" in str(err.value)
        return
    seen = visible({"CUDA_VISIBLE_DEVICES": value}, count)
    assert list(seen.ids) == [str(int(e)) if e.isdigit() else e for e in prefix]  # stops at the first invalid
    assert (seen.stopped_at is None) == (len(prefix) == len(value.split(",")))
    assert len(set(seen.ids)) == len(seen.ids)


@pytest.mark.parametrize("value, needles", [
    ("0,0", ["CUDA_VISIBLE_DEVICES '0,0'", "names GPU 0 twice"]),
    ("1,01", ["names GPU 1 twice"]),
    ("GPU-ab,GPU-AB", ["twice"]),
    ("1,-1,3", ["CUDA stops at the entry '-1'", "--replicas 2 x --tp 1 needs 2 GPUs"]),
    ("0,junk", ["CUDA stops at the entry 'junk'", "needs 2 GPUs"]),
    ("", ["hides every GPU"]),
])
def test_plan_and_serve_read_cuda_visible_devices_as_cuda_does(launch, tmp_path, value, needles):
    env = {"CUDA_VISIBLE_DEVICES": value, "LAUNCH_CACHE_DIR": str(tmp_path / "cache")}
    for command in (["plan"], ["serve", "--dry-run"]):
        result = launch(command[0], *PLAN_MODEL, "--replicas", "2", *command[1:], env=env)
        assert_one_line_error(result, *needles)
    assert not (tmp_path / "cache").exists()


def test_uuid_ids_are_laid_out_as_given(launch):
    result = launch("plan", *PLAN_MODEL, "--replicas", "2", "--json",
                    env={"CUDA_VISIBLE_DEVICES": "GPU-aa11,MIG-bb22/1/0,junk,3"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["cuda_visible_devices"] for r in data["replicas"]] == ["GPU-aa11", "MIG-bb22/1/0"]
    text = launch("plan", *PLAN_MODEL, "--replicas", "2", env={"CUDA_VISIBLE_DEVICES": "GPU-aa11,MIG-bb22/1/0,junk,3"})
    assert "CUDA stops at the entry 'junk'" in text.stdout


def test_serve_refuses_a_repeated_gpu_before_anything(tmp_path):
    result = launch_with_gpu("serve", *PLAN_MODEL, "--replicas", "2", "--port", str(free_port()),
                             env={"CUDA_VISIBLE_DEVICES": "0,0", "LAUNCH_CACHE_DIR": str(tmp_path / "cache")})
    assert_one_line_error(result, "names GPU 0 twice")
    assert not (tmp_path / "cache").exists()


def test_one_port_two_serves_the_second_refused(model_dir, tmp_path):
    """Serve holds its port claim from before it writes anything: a second serve on that port while
    the first runs stops with one line (here at the bind check or at the claim; either way one
    line) and leaves the first one's files alone."""
    from tests.integration.serve.test_serve import start_driver

    port = free_port()
    first = start_driver(model_dir, port, tmp_path)
    with killed_if_running(first):
        from tests.integration.serve.test_serve import read_until

        read_until(first, "curl")
        second = launch_with_gpu("serve", str(model_dir), "--factor", "2", "--backend", "pytorch", "--port", str(port),
                                 env={"LAUNCH_CACHE_DIR": str(tmp_path / "cache")})
        assert_one_line_error(second, f"port {port}", "already in use")
        first.send_signal(2)
        first.wait(timeout=30)
    assert first.returncode == 0
