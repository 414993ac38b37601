"""The proxy process's two defences (launcher/engine/proxy_server.py), on their own, and the watchdog
when lmdeploy's node list cannot be read (launcher/scaleout/watchdog.py):

- the door on lmdeploy's open ``POST /nodes/add``: a body whose text UTF-8 cannot carry, or a node URL
  the one node rule refuses, is answered 400 with one line and never reaches lmdeploy (one such entry
  made lmdeploy's ``/nodes/status`` answer 500 for good); every other request reaches lmdeploy byte
  for byte;
- the redacting streams of the proxy process (its log, ``proxy.log``): no URL's ``user:password@``
  is written, however the text is cut into writes;
- the watchdog still takes out a dead node it knows while the node list cannot be read.

The real lmdeploy proxy behind ``launch proxy start`` is in tests/integration/scaleout/test_proxy_door.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.parse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.engine.proxy_server import NodeDoor, RedactingStream, node_problem, redact_text
from launcher.net import http
from launcher.runtime.address import free_ports
from launcher.scaleout import watchdog
from launcher.scaleout.watchdog import Watchdog

ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates, controls and separators included
SECRET = "Zq9"  # what every generated password starts with


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` three times in four, else ``odd``: each part is hostile on its own often enough."""
    return st.integers(0, 3).flatmap(lambda n: odd if n == 0 else usual)


@st.composite
def node_urls(draw) -> tuple[str, str]:
    """(a URL, its password or ""): shapes around the one node rule, and hostile text in every part."""
    scheme = draw(mostly(st.sampled_from(["http://", "https://", "HTTP://"]), st.sampled_from(["ftp://", "", "http:/"])))
    printable = st.characters(categories=["L", "N", "P", "S"])  # "@", "/", "#", "%" and "é" among them
    password = SECRET + draw(mostly(st.text(printable, max_size=8), st.text(ANY_CHAR, max_size=6))) \
        if draw(st.booleans()) else ""
    userinfo = draw(st.sampled_from(["", "u:", ":", "user:"])) + password + "@" if password else ""
    host = draw(mostly(st.sampled_from(["127.0.0.1", "[::1]", "node-1.cluster", "localhost"]),
                       st.one_of(st.sampled_from(["0.0.0.0", "256.1.1.1", "\udcff", "h\u3000", ""]),
                                 st.text(ANY_CHAR, max_size=6))))
    port = draw(mostly(st.integers(1, 65535).map(lambda p: f":{p}"),
                       st.one_of(st.integers(0, 70000).map(lambda p: f":{p}"), st.sampled_from(["", ":", ":x", ":\udcff"]))))
    rest = draw(mostly(st.sampled_from(["", "/", "/v1", "#x", "?a=1"]),
                       st.one_of(st.sampled_from(["\n", " ", "/a b"]), st.text(ANY_CHAR, max_size=4))))
    lead = draw(mostly(st.just(""), st.sampled_from([" ", "\t"])))
    return lead + scheme + userinfo + host + port + rest, password


def door(method: str, path: str, chunks: list[bytes]) -> tuple[int, bytes, bytes | None]:
    """(status, body) the door answers for a request whose body arrives in ``chunks``, and the body the
    app behind it read (None: the app was never called)."""
    reached: dict[str, bytes] = {}

    async def app(scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reached["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'"Added successfully"'})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")]}
    asyncio.run(NodeDoor(app)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), reached.get("body")


def body_of(url: str, models: list[str] | None = None) -> bytes:
    return json.dumps({"url": url, "status": {"models": models or ["m"]}}).encode()  # ASCII: surrogates as \udcff


# --- the rule ----------------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node_urls())
def test_a_url_the_rule_takes_renders_in_json_is_reachable_and_its_password_redacts(case):
    url, password = case
    problem = node_problem(url)
    assert watchdog.node_problem is node_problem  # the watchdog takes out by the door's rule
    if problem is not None:
        assert problem.isprintable() and problem
        return
    url.encode("utf-8")  # lmdeploy's /nodes/status renders it
    assert url.isprintable() and url == url.strip()
    parsed = http.parse_url(url)
    assert url.lower().startswith(("http://", "https://")) and 1 <= parsed.port <= 65535
    shown = redact_text(f"add node {url} successfully\n")
    assert shown == f"add node {http.redact(url)} successfully\n"
    assert "@" not in urllib.parse.urlsplit(http.redact(url)).netloc
    if password:
        assert password not in shown


@settings(max_examples=300, deadline=None)
@given(node_urls(), st.lists(st.integers(0, 200), max_size=6))
def test_the_log_streams_write_no_password_however_the_text_is_cut(case, cuts):
    url, password = case
    if node_problem(url) is not None or not password:
        return
    text = f"INFO add node {url} successfully\nINFO A request is dispatched to {url}\n"
    out = io.StringIO()
    stream = RedactingStream(out)
    for piece in [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)], strict=True)]:
        stream.write(piece)
    stream.flush()
    assert out.getvalue() == redact_text(text) and password not in out.getvalue()


@given(st.text(ANY_CHAR))
def test_text_without_a_url_is_written_as_it_is(text):
    if "://" in text:
        return
    out = io.StringIO()
    stream = RedactingStream(out)
    stream.write(text)
    stream.flush()
    assert out.getvalue() == text == redact_text(text)


# --- the door ----------------------------------------------------------------------------------------

REFUSED = [
    (body_of("http://\udcff:1"), "not a printable character"),  # issue 17 F4.1: /nodes/status 500 for good
    (body_of("http://\udcff:x@127.0.0.1:1"), "not a printable character"),
    (body_of("http://127.0.0.1:1#\udcff"), "not a printable character"),
    (body_of("http://127.0.0.1:1", ["\udcff"]), "not UTF-8"),  # a model name: /v1/models 500 too
    (b'{"url": "http://127.0.0.1:1", "status": {"models": ["m"]}, "\\udcff": 1}', "not UTF-8"),
    (body_of("not a url"), "no http:// or https://"),
    (body_of("ftp://127.0.0.1:21"), "http(s) address"),
    (body_of("http://127.0.0.1:99999"), "port"),
    (body_of("http://127.0.0.1:0"), "port"),
    (body_of("http://h:1\n"), "not a printable character"),
    (body_of(" http://h:1"), "blank"),
    (body_of("http://u:p\u3000w@h:1"), "not a printable character"),
    (b'{"url": "http://127.0.0.1:1", "url": "http://\\udcff:1"}', "not a printable character"),  # the last one counts
]


def test_a_body_lmdeploy_would_keep_broken_is_400_in_one_line_and_never_reaches_it():
    for body, why in REFUSED:
        status, answer, reached = door("POST", "/nodes/add", [body[:7], body[7:]])
        assert (status, reached) == (400, None), body
        detail = json.loads(answer)["detail"]
        assert why in detail and detail.isprintable() and detail.startswith("launch's proxy takes no such node: "), detail


def test_a_password_in_a_refused_url_is_not_in_the_answer():
    status, answer, _ = door("POST", "/nodes/add", [body_of(f"http://u:{SECRET}-pw@127.0.0.1:99999")])
    assert status == 400 and SECRET not in answer.decode() and "http://127.0.0.1:99999" in answer.decode()


def test_everything_else_reaches_lmdeploy_byte_for_byte():
    passed = [
        ("POST", "/nodes/add", body_of("http://127.0.0.1:23333")),
        ("POST", "/nodes/add", body_of(f"http://u:{SECRET}@127.0.0.1:5/")),
        ("POST", "/nodes/add", body_of("https://node-1.cluster:443", ["caf\u00e9"])),
        ("POST", "/nodes/add", b'{"url": "http://127.1:5"}'),
        ("POST", "/nodes/add", b"not json"),  # lmdeploy's own 422
        ("POST", "/nodes/add", b'{"url": 5}'),
        ("POST", "/nodes/add", b""),
        ("POST", "/nodes/remove", body_of("http://\udcff:1")),  # removes nothing; stores nothing
        ("POST", "/v1/chat/completions", body_of("http://\udcff:1")),
        ("GET", "/nodes/add", b""),
    ]
    for method, path, body in passed:
        assert door(method, path, [body[:3], body[3:]]) == (200, b'"Added successfully"', body), (method, path, body)


# --- the watchdog without the node list ---------------------------------------------------------------


def test_the_watchdog_takes_out_a_dead_node_it_knows_while_the_node_list_cannot_be_read(scripted):
    node = f"http://127.0.0.1:{free_ports(1)}"  # nothing listens: /health refused
    listed = json.dumps({node: {"models": ["m"], "unfinished": 0}}).encode()
    scripted.replies[("GET", "/nodes/status")] = (200, listed)
    scripted.replies[("POST", "/nodes/remove")] = (200, b'"Deleted successfully"')
    lines: list[str] = []
    watchdog = Watchdog(scripted.url, interval_s=0.1, timeout_s=1.0, failures=2, report=lines.append)
    watchdog.step()  # listed; its first failed check
    scripted.replies[("GET", "/nodes/status")] = (500, b"Internal Server Error")
    watchdog.step()  # the list is unreadable: the second failed check still takes it out
    removes = [json.loads(body) for method, path, _, body in scripted.seen if (method, path) == ("POST", "/nodes/remove")]
    assert removes == [{"url": node}]
    assert [r.url for r in watchdog.removed()] == [node]
    assert len(lines) == 2 and "GET /nodes/status answered HTTP 500" in lines[0], lines
    assert lines[1].startswith(f"watchdog: took {node} out of the proxy: /health connection refused"), lines


def test_while_the_node_list_cannot_be_read_nothing_is_added_back(scripted):
    node = scripted.url  # the scripted server is the node too: its /health answers what the test says
    scripted.replies[("GET", "/nodes/status")] = (200, json.dumps({node: {"models": ["m"]}}).encode())
    scripted.replies[("GET", "/health")] = (503, b"{}")
    scripted.replies[("POST", "/nodes/remove")] = (200, b'"Deleted successfully"')
    scripted.replies[("POST", "/nodes/add")] = (200, b'"Added successfully"')
    watchdog = Watchdog(scripted.url, interval_s=0.1, timeout_s=1.0, failures=1)
    watchdog.step()
    assert [r.url for r in watchdog.removed()] == [node]
    scripted.replies[("GET", "/nodes/status")] = (500, b"Internal Server Error")
    scripted.replies[("GET", "/health")] = (200, b"{}")
    watchdog.step()  # it answers, but whether it is registered again meanwhile cannot be read
    assert ("POST", "/nodes/add") not in [(m, p) for m, p, _, _ in scripted.seen]
    scripted.replies[("GET", "/nodes/status")] = (200, b"{}")
    watchdog.step()
    adds = [json.loads(body) for method, path, _, body in scripted.seen if (method, path) == ("POST", "/nodes/add")]
    assert adds == [{"url": node, "status": {"models": ["m"]}}] and watchdog.removed() == []


def test_entries_found_all_the_same_are_taken_out_with_one_line_each(scripted):
    """The door keeps them out of launch's proxy; the watchdog still takes out any it finds, once."""
    bad = ["not a url", "ftp://127.0.0.1:21", "http://127.0.0.1:99999", f"http://user:{SECRET}-pw@h:99999",
           "http://127.0.0.1:0", "http://\udcff:1", " http://127.0.0.1:5"]
    scripted.replies[("GET", "/nodes/status")] = (200, json.dumps({url: {"models": ["m"]} for url in bad}).encode())
    scripted.replies[("POST", "/nodes/remove")] = (200, b'"Deleted successfully"')
    lines: list[str] = []
    watchdog = Watchdog(scripted.url, interval_s=0.1, timeout_s=1.0, report=lines.append)
    for _ in range(3):  # lmdeploy here forgets nothing: the same entries every round, said once each
        watchdog.step()
    removes = [json.loads(body)["url"] for method, path, _, body in scripted.seen if (method, path) == ("POST", "/nodes/remove")]
    assert sorted(removes) == sorted(bad * 3)
    assert len(lines) == len(bad) and all("is not a URL the proxy can reach" in line for line in lines), lines
    assert all(line.isprintable() and SECRET not in line for line in lines)
