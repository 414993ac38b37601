"""What one request to lmdeploy's open node API can do to `launch proxy start --router lmdeploy` (issue 17,
third pass), as classes, against the REAL proxy process on 127.0.0.1:

- a node the one node rule refuses, or text UTF-8 cannot carry, is answered 400 in one line at the
  door and never stored: before, one ``{"url": "http://\\udcff:1"}`` made ``/nodes/status`` answer 500
  for good, and with it the watchdog, `proxy status` and `proxy add` (F4.1);
- no URL's ``user:password@`` reaches a log launch keeps: lmdeploy logs every node it adds, removes
  and routes to (F5.1); the log is the user's alone (0600).

Replicas are stand-ins (tests/support/standin_replica.py). The rule and the door on their own are in
tests/unit/scaleout/test_node_door.py.
"""

from __future__ import annotations

import http.client as http_client
import json
import signal
import stat
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.engine.proxy_server import node_problem
from launcher.net import http
from launcher.scaleout.nodes import deregister, proxy_nodes
from tests.conftest import free_port
from tests.integration.scaleout import test_proxy
from tests.integration.scaleout.test_proxy import MODEL, start_launch_proxy, stop, wait_for

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

KEY = "door-test-key-1"
PASSWORD = "N0de-PW~5150!$&'()*+,;="


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("door")
    port = free_port()
    proc, out, err = start_launch_proxy(tmp, port, "--router", "lmdeploy", "--api-key", KEY)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "proc": proc, "out": out, "err": err,
           "cache": tmp / "cache"}
    assert stop(proc) == 0, err.read_text()[-2000:]


empty_proxy = test_proxy.empty_proxy
replicas = test_proxy.replicas


def add(proxy: str, url: str, models: list[str] | None = None) -> http.Reply:
    """``POST /nodes/add`` as anyone may (no key: lmdeploy's node API asks none), models filled: no probe."""
    return http.post(proxy + "/nodes/add", {"url": url, "status": {"models": models or [MODEL]}}, timeout=10)


# --- F4.1: the door ---------------------------------------------------------------------------------

HOSTILE = [("http://\udcff:1", None), ("http://\udcff:x@127.0.0.1:1", None), ("http://127.0.0.1:1#\udcff", None),
           ("http://127.0.0.1:1", ["\udcff"]), ("not a url", None), ("ftp://127.0.0.1:21", None),
           ("http://127.0.0.1:99999", None), ("http://127.0.0.1:0", None), ("http://127.0.0.1:1\n", None),
           (" http://127.0.0.1:1", None), ("http://[::1", None)]


def test_a_node_lmdeploy_would_keep_broken_is_refused_at_the_door_and_the_node_api_keeps_working(
        empty_proxy, replicas, launch):
    proxy, err = empty_proxy["url"], empty_proxy["err"]
    before = len(err.read_text().splitlines())
    for url, models in HOSTILE:
        reply = add(proxy, url, models)
        detail = reply.detail()
        assert reply.status == 400 and detail.startswith("launch's proxy takes no such node: "), (url, reply)
        assert detail.isprintable(), detail
        assert http.get(proxy + "/nodes/status", timeout=5).status == 200, url
        assert proxy_nodes(proxy) == {}
    assert http.get(proxy + "/v1/models", api_key=KEY, timeout=5).json()["data"] == []
    listed = launch("proxy", "status", "--proxy", proxy)
    assert listed.returncode == 0, listed.stderr
    url = replicas.start(key=KEY)
    added = launch("proxy", "add", url, "--proxy", proxy, "--api-key", KEY)
    assert added.returncode == 0 and added.stdout.strip() == f"added {url} ({MODEL})", added.stderr
    assert "retrying" not in "\n".join(err.read_text().splitlines()[before:])


def test_valid_nodes_are_lmdeploys_as_before(empty_proxy):
    proxy = empty_proxy["url"]
    for url in ("http://127.0.0.1:1", f"http://u:{urllib.parse.quote(PASSWORD)}@127.0.0.1:2", "https://node-1.cluster:8443"):
        reply = add(proxy, url, [MODEL, "caf\u00e9"])
        assert (reply.status, reply.json()) == (200, "Added successfully")
        assert proxy_nodes(proxy)[url].models == (MODEL, "caf\u00e9")
        deregister(proxy, url)
    probed = http.post(proxy + "/nodes/add", {"url": f"http://127.0.0.1:{free_port()}"}, timeout=30)
    assert probed.status == 200 and "error_code" in probed.json()  # lmdeploy's own answer: it probes, nothing there
    conn = http_client.HTTPConnection("127.0.0.1", empty_proxy["port"], timeout=5)
    conn.request("POST", "/nodes/add", body=b"{not json", headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 422  # FastAPI's, as before
    conn.close()


@st.composite
def hostile_bodies(draw) -> dict:
    text = st.text(st.characters(exclude_categories=()), max_size=8)
    url = draw(st.one_of(text, st.builds(lambda h, p, r: f"http://{h}:{p}{r}", st.one_of(st.just("127.0.0.1"), text),
                                         st.integers(0, 70000), text)))
    return {"url": url, "status": {"models": [draw(st.one_of(st.just(MODEL), text))]}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(hostile_bodies())
def test_whatever_anyone_adds_the_node_list_stays_readable_and_holds_only_what_the_rule_takes(empty_proxy, body):
    proxy = empty_proxy["url"]
    reply = http.post(proxy + "/nodes/add", body, timeout=10)
    listed = http.get(proxy + "/nodes/status", timeout=5)
    assert listed.status == 200, (body, listed)
    nodes = listed.json()
    assert all(node_problem(url) is None for url in nodes), nodes
    if reply.status == 200:  # (the watchdog may have spelled it its way meanwhile: http://h:1/ as http://h:1)
        assert reply.json() == "Added successfully" and node_problem(body["url"]) is None
    else:
        assert reply.status == 400 and body["url"] not in nodes, reply
    for url in nodes:
        deregister(proxy, url)


# --- F5.1: no secret in the log ---------------------------------------------------------------------


def test_a_node_password_reaches_no_log_launch_keeps(tmp_path, replicas):
    port = free_port()
    proc, _out, err = start_launch_proxy(tmp_path, port, "--router", "lmdeploy")
    proxy = f"http://127.0.0.1:{port}"
    log = tmp_path / "cache" / "runs" / f"proxy-{port}" / "proxy.log"
    try:
        node = replicas.start(key=None)
        secret = node.replace("http://", f"http://user:{PASSWORD}@")
        dead = f"http://user:{PASSWORD}@127.0.0.1:{free_port()}"
        assert add(proxy, secret).json() == "Added successfully"
        assert http.post(proxy + "/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=20).status == 200  # "A request is dispatched to ..."
        assert http.post(proxy + "/nodes/remove", {"url": secret}, timeout=5).ok
        assert http.post(proxy + "/nodes/add", {"url": dead}, timeout=30).status == 200  # probed: an error logged
        assert add(proxy, dead).ok  # the watchdog takes it out, and says so
        assert wait_for(lambda: dead not in proxy_nodes(proxy), 10, 0.2)
    finally:
        assert stop(proc, signal.SIGINT) == 0, err.read_text()[-2000:]
    text = log.read_text(encoding="utf-8", errors="replace")
    shown = node.removeprefix("http://")
    assert f"add node http://{shown} successfully" in text and f"dispatched to http://{shown}" in text, text[-3000:]
    assert f"delete node http://{shown} successfully" in text
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        for form in (PASSWORD, urllib.parse.quote(PASSWORD), urllib.parse.quote(PASSWORD, safe="")):
            assert form.encode() not in data, (path, form)


def test_the_proxy_log_is_the_users_alone(tmp_path):
    port = free_port()
    proc, _out, err = start_launch_proxy(tmp_path, port, "--router", "lmdeploy")
    stop(proc, signal.SIGINT)
    log = tmp_path / "cache" / "runs" / f"proxy-{port}" / "proxy.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600, oct(log.stat().st_mode)
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700, oct(log.parent.stat().st_mode)
    assert json.dumps(err.read_text())  # (the run itself went through)
