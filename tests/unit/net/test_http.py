"""launcher/net/http.py, the one HTTP client, against real sockets on 127.0.0.1: normal replies, a server
that accepts and never answers, one that sends a byte a second, a closed port, credentials in URLs."""

from __future__ import annotations

import json
import time
from http import client as stdlib_http

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.net import http
from launcher.rules.checks import BadOption
from launcher.runtime.address import free_ports
from tests.support.servers import JSONHandler, RawServer, serving, url_of


class _Echo(JSONHandler):
    def do_GET(self):
        if self.path == "/missing":
            self.send_json(404, {"detail": "Not Found"})
            return
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "b"}, {"id": "a"}]})
            return
        self.send_json(200, {"path": self.path, "auth": self.headers.get("Authorization")})

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_json(200, {"got": data, "auth": self.headers.get("Authorization")})


@pytest.fixture
def echo():
    with serving(_Echo) as server:
        yield url_of(server)


def test_get_and_post_json(echo):
    reply = http.get(echo + "/v1/other", timeout=5)
    assert reply.ok and reply.json()["path"] == "/v1/other"
    reply = http.post(echo + "/x", {"a": 1}, api_key="k1", timeout=5)
    assert reply.json() == {"got": {"a": 1}, "auth": "Bearer k1"}


def test_error_status_is_a_reply_with_the_servers_detail(echo):
    reply = http.get(echo + "/missing", timeout=5)
    assert reply.status == 404 and not reply.ok
    assert reply.detail() == "Not Found"


@pytest.mark.parametrize("behaviour", ["silent", "drip"], ids=["silent", "one-byte-a-second"])
def test_one_deadline_covers_the_whole_request(behaviour):
    with RawServer(behaviour) as server:
        start = time.monotonic()
        with pytest.raises(http.DeadlineExceeded) as info:
            http.get(server.url + "/health", timeout=1.5)
        elapsed = time.monotonic() - start
    # never before the deadline; and ending at all is the point (the server never finishes): the upper
    # bound only keeps a broken deadline from hanging the suite
    assert 1.45 <= elapsed < 1.5 + 20
    assert "did not answer within 1.5 s" in str(info.value)


def test_closed_port_is_unreachable_and_status_of_is_none():
    port = free_ports(1)
    with pytest.raises(http.Unreachable, match="connection refused"):
        http.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert http.status_of(f"http://127.0.0.1:{port}/health", timeout=1) is None


def test_credentials_in_the_url_are_sent_but_never_shown(echo):
    url = echo.replace("http://", "http://user:s3cret@") + "/health"
    reply = http.get(url, timeout=5)
    assert reply.json()["auth"].startswith("Basic ")
    assert "s3cret" not in reply.url
    closed = "http://user:s3cret@127.0.0.1:1/health"
    with pytest.raises(http.Unreachable) as info:
        http.get(closed, timeout=5)
    assert "s3cret" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    assert http.redact(closed) == "http://127.0.0.1:1/health"


@pytest.mark.parametrize("bad", ["ftp://x", "http://", "http://h:99999", "http://h\x07:80"])
def test_bad_urls_are_refused_naming_the_option(bad):
    with pytest.raises(BadOption) as info:
        http.parse_url(bad, option="--url")
    assert info.value.option == "--url"


def test_loopback_ignores_proxy_from_the_environment(echo, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    assert http.get(echo + "/health", timeout=5).ok


# A URL http.client cannot send: before, a space in the host was an InvalidURL traceback out of
# `launch probe --url`, and a space or a non-ASCII letter in the path "cannot reach ...: the connection
# broke (InvalidURL)". Now each is refused naming the option, before any connection.
UNSENDABLE = ["http://a b:1", "http://127.0.0.1:9/a b", "http://127.0.0.1:9/\u00fc", "http://127.0.0.1:9/?q=\u00e9",
              "http://127.0.0.1:9/a\u2028b", "http://u:p ss@127.0.0.1:9/"]


@pytest.mark.parametrize("url", UNSENDABLE)
def test_a_url_http_cannot_send_is_refused_naming_the_option(url):
    with pytest.raises(BadOption) as info:
        http.get(url, timeout=2)
    assert info.value.option == "--url" and "ss@" not in str(info.value) and str(info.value).isprintable()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(host=st.text(max_size=10), path=st.text(max_size=10))
def test_any_url_is_refused_or_sent_never_an_exception_of_another_kind(echo, host, path):
    """The host: refused, or one http.client takes (no connection made: a name would be looked up).
    The path: refused, or sent to a server here and answered."""
    try:
        parsed = http.parse_url(f"http://{host}:1/")
    except BadOption:
        pass
    else:
        stdlib_http.HTTPConnection(parsed.host, parsed.port)  # InvalidURL for a host it cannot send
    try:
        reply = http.get(f"{echo}/{path}", timeout=5)
    except BadOption:
        return
    assert reply.status in (200, 404)
