"""launcher/scaleout/nodes.py on the one client of lmdeploy's endpoints: what the proxy commands say
for each answer of the proxy's node API and of a node, against servers of the tests' own on 127.0.0.1
(``tests.support.servers.Scripted``, any reply exactly as given; the real lmdeploy proxy is in
tests/integration/scaleout/test_proxy.py). Every message one printable line, every node list whatever
was registered in it read or refused, never a traceback."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.errors import LaunchError
from launcher.net.lmdeploy import Health, Node
from launcher.runtime.address import free_ports
from launcher.scaleout.nodes import (
    NodeBadModels,
    NodeUnauthorized,
    ProxyRefused,
    ProxyUnreachable,
    deregister,
    node_models,
    proxy_nodes,
    register,
)
from launcher.scaleout.state import Removed
from launcher.scaleout.status import NodeStatus, render_status


def one_printable_line(err: BaseException) -> str:
    text = str(err)
    assert text.isprintable() and "\n" not in text, text
    return text


def test_the_node_list_in_the_proxy_commands_words(scripted):
    scripted.replies[("GET", "/nodes/status")] = (200, b'{"http://h:1": {"models": ["m"], "unfinished": 1}, "x": null}')
    assert proxy_nodes(scripted.url) == {"http://h:1": Node("http://h:1", ("m",), 1), "x": Node("x", (), 0)}
    closed = f"http://127.0.0.1:{free_ports(1)}"
    with pytest.raises(ProxyUnreachable) as info:
        proxy_nodes(closed)
    assert one_printable_line(info.value) == (f"the proxy at {closed} does not answer its node API (connection "
                                              "refused). Is `launch proxy start` running there? Check --proxy.")
    scripted.replies[("GET", "/nodes/status")] = (404, b'{"detail": "Not Found"}')
    with pytest.raises(ProxyUnreachable, match=r"GET /nodes/status answered HTTP 404; is it launch's router\?"):
        proxy_nodes(scripted.url)


# lmdeploy sends none of these; a proxy that is not lmdeploy's, or a broken one, may. Before the one
# client, 1e999 was an OverflowError traceback and a models string was read letter by letter.
HOSTILE_LISTS = [b'{"u": {"unfinished": 1e999}}', b'{"u": {"unfinished": NaN}}', b'{"u": {"unfinished": "x"}}',
                 b'{"u": {"models": "mod"}}', b'{"u": {"models": [1]}}', b'{"u": {"unfinished": true}}',
                 b'{"u": {"unfinished": 1.5}}', b'{"u": []}', b"[]", b"not json", b'{"u": {"models": [NaN]}}',
                 b"[" * 100_000]


@pytest.mark.parametrize("reply", HOSTILE_LISTS, ids=range(len(HOSTILE_LISTS)))
def test_a_node_list_that_is_not_lmdeploys_is_one_line_not_a_guess(scripted, reply):
    scripted.replies[("GET", "/nodes/status")] = (200, reply)
    with pytest.raises(ProxyUnreachable) as info:
        proxy_nodes(scripted.url)
    assert one_printable_line(info.value).endswith("(GET /nodes/status did not answer with lmdeploy's node list). "
                                                   "Is `launch proxy start` running there? Check --proxy.")


def json_values():
    """Any JSON value, NaN and the infinities included (Python's json writes them)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(listed=json_values() | st.dictionaries(st.text(max_size=6), st.none() | st.fixed_dictionaries(
    {}, optional={"models": st.lists(st.text(max_size=4), max_size=2) | json_values(),
                  "unfinished": st.integers() | json_values()}), max_size=3))
def test_any_node_list_is_read_as_lmdeploys_or_refused_in_one_line(scripted, listed):
    scripted.replies[("GET", "/nodes/status")] = (200, json.dumps(listed).encode())
    try:
        nodes = proxy_nodes(scripted.url)
    except ProxyUnreachable as err:
        assert one_printable_line(err).endswith("Check --proxy.")
        return
    assert isinstance(listed, dict) and list(nodes) == list(listed)
    for url, node in nodes.items():
        status = listed[url] or {}
        assert isinstance(status.get("models") or [], list) and all(isinstance(m, str) for m in node.models)
        assert node.models == tuple(status.get("models") or ())
        assert node.unfinished == (status.get("unfinished") or 0) and type(node.unfinished) is int


@pytest.mark.parametrize(("reply", "said"), [
    ((200, b'"Failed to add, please check the input url."'), "Failed to add, please check the input url."),
    ((200, b'{"error_code": 10401, "text": "no\\u001b[2J\\nnode"}'), "no\\x1b[2J\\nnode"),
    ((500, b'{"detail": "boom"}'), "HTTP 500: boom"),
    ((401, b'{"detail": "Unauthorized."}'), "HTTP 401: Unauthorized."),
    ((200, b"Added successfully"), "the body is not JSON: b'Added successfully'"),
])
def test_a_node_the_proxy_did_not_add_is_said_in_its_words(scripted, reply, said):
    scripted.replies[("POST", "/nodes/add")] = reply
    scripted.replies[("POST", "/nodes/remove")] = reply
    for action, call in (("add", register), ("remove", deregister)):
        with pytest.raises(ProxyRefused) as info:
            call(scripted.url, "http://h:1", *([("m",)] if action == "add" else []))
        assert one_printable_line(info.value) == f"the proxy at {scripted.url} refused to {action} http://h:1: {said}"


def test_registering_sends_the_models_and_needs_lmdeploys_success(scripted):
    scripted.replies[("POST", "/nodes/add")] = (200, b'"Added successfully"')
    scripted.replies[("POST", "/nodes/remove")] = (200, b'"Deleted successfully"')
    register(scripted.url, "http://h:1", ("a", "b"))
    deregister(scripted.url, "http://h:1")
    assert [json.loads(seen[3]) for seen in scripted.seen] == [{"url": "http://h:1", "status": {"models": ["a", "b"]}},
                                                           {"url": "http://h:1"}]


@pytest.mark.parametrize(("reply", "error", "said"), [
    ((401, b'{"detail": "no"}'), NodeUnauthorized, "needs an API key (HTTP 401 on /v1/models)"),
    ((500, b'{"detail": "x\\u001by"}'), NodeBadModels, "(HTTP 500: x\\x1by)"),
    ((200, b'{"data": []}'), NodeBadModels, "(it lists no model)"),
    ((200, b'{"data": [{"id": 5}]}'), NodeBadModels, "(a data[].id is not a model name (a non-empty string))"),
    ((200, b'{"error_code": 10402, "text": "gone"}'), NodeBadModels, "(error_code 10402: gone)"),
    ((200, b'{"data": [{"id": "m", "max": Infinity}]}'), NodeBadModels, "Infinity, which is not a JSON number"),
])
def test_a_nodes_model_names_or_why_not(scripted, reply, error, said):
    scripted.replies[("GET", "/v1/models")] = reply
    with pytest.raises(error) as info:
        node_models(scripted.url)
    assert said in one_printable_line(info.value)
    scripted.replies[("GET", "/v1/models")] = (200, b'{"data": [{"id": "m"}]}')
    assert node_models(scripted.url, "k") == ("m",) and scripted.seen[-1][2]["Authorization"] == "Bearer k"


def test_the_status_table_shows_whatever_was_registered_printable():
    """lmdeploy's node API takes any string from anyone, as a URL and as model names."""
    hostile = "http://h:1/\x1b]0;title\x07\nx"
    rows = [NodeStatus(Node(hostile, ("m\x1b[31m", "\u2028"), 0), Health(hostile, None, "not a URL launch can reach"))]
    gone = Removed("http://g:2", ("m\n2",), 1_700_000_000.0, "/health connection refused (2 checks in a row)")
    text = render_status("http://127.0.0.1:8000", rows, [gone])
    lines = text.splitlines()
    assert all(line.isprintable() for line in lines) and "\x1b" not in text
    assert len(lines) == 1 + 1 + 1 + 1 + 1 + 1  # header, column names, the node, the note, column names, removed
    assert "http://h:1/\\x1b]0;title\\x07\\nx" in lines[2] and "m\\x1b[31m, \\u2028" in lines[2] and "m\\n2" in lines[5]


def test_the_client_errors_are_launch_errors():
    """The edge prints a LaunchError as one line; nothing the node API does escapes as another kind."""
    for entry in ("not a url", "ftp://x", "http://h:99999", "http://h:1/a b"):
        with pytest.raises(LaunchError):
            proxy_nodes(entry)
