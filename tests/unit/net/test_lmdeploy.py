"""launcher/net/lmdeploy.py, the one client for lmdeploy's endpoints, against servers of the tests' own
on 127.0.0.1 (``tests.support.servers.Scripted``: any reply, exactly as given): URLs, the API key,
credentials never shown, non-finite numbers and wrong types refused, errors in one shape, the server's
words printable, and the proxy's node API."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.net import http
from launcher.net.lmdeploy import (
    Client,
    ServerBadReply,
    ServerErrorBody,
    ServerHTTPError,
    ServerRefused,
    ServerUnauthorized,
    check_health,
    check_health_all,
    health_status,
    normalize_url,
    read_json,
    served_models,
)
from launcher.rules.checks import BadOption
from launcher.runtime.address import free_ports

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
MODELS = json.dumps({"object": "list", "data": [{"id": "b"}, {"id": "a"}]}).encode()


def body(value: object) -> bytes:
    return json.dumps(value).encode()


# --- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given_url", "expected"), [
    ("127.0.0.1:23333", "http://127.0.0.1:23333"),
    ("http://127.0.0.1:23333/v1/", "http://127.0.0.1:23333"),
    ("https://example.org/llm/v1", "https://example.org/llm"),
    ("http://u:p%40ss@h:1/v1", "http://u:p%40ss@h:1"),  # credentials kept as given: sent as Basic auth
    ("http://127.0.0.1:23333?x=1", "http://127.0.0.1:23333"),  # a query never becomes the host
    ("http://127.0.0.1:23333#top", "http://127.0.0.1:23333"),
    ("http://127.0.0.1:23333/v1?x#y", "http://127.0.0.1:23333"),
    ("  http://h:1/  ", "http://h:1"),
])
def test_every_spelling_of_a_server_becomes_its_root(given_url, expected):
    assert normalize_url(given_url) == expected


@PROPERTY
@given(port=st.integers(1, 65535), path=st.sampled_from(["", "/", "/v1", "/v1/", "/llm", "/llm/v1/"]),
       tail=st.sampled_from(["", "?a=1", "#f", "?a#f", "?/v1/models"]))
def test_a_normalised_url_is_a_root_that_requests_can_be_joined_to(port, path, tail):
    url = normalize_url(f"http://127.0.0.1:{port}{path}{tail}")
    parsed = http.parse_url(url + "/v1/models")
    assert (parsed.host, parsed.port) == ("127.0.0.1", port)
    assert parsed.path == path.rstrip("/").removesuffix("/v1") + "/v1/models"  # no query: nothing leaked into it
    assert normalize_url(url) == url


@pytest.mark.parametrize("bad", ["ftp://x", "http://", "http://h:99999", "http://h\x1b:80"])
def test_a_url_that_is_no_server_is_refused_naming_the_option(bad):
    with pytest.raises(BadOption) as info:
        Client(bad, option="--proxy")
    assert info.value.option == "--proxy" and str(info.value).isprintable()


def test_the_key_goes_as_a_bearer_and_credentials_as_basic_auth_never_shown(scripted):
    scripted.replies[("GET", "/v1/models")] = (200, MODELS)
    assert Client(scripted.url + "/v1", api_key="k1").models() == ["b", "a"]
    assert Client(scripted.url).models() == ["b", "a"]
    secret = scripted.url.replace("http://", "http://user:s3cret@")
    client = Client(secret)
    assert client.models() == ["b", "a"] and "s3cret" not in client.shown
    auth = [headers.get("Authorization") for _, _, headers, _ in scripted.seen]
    assert auth[0] == "Bearer k1" and auth[1] is None and auth[2].startswith("Basic ")
    scripted.replies[("GET", "/v1/models")] = (401, body({"detail": "no"}))
    for key in (None, "wrong"):
        with pytest.raises(ServerUnauthorized) as info:
            Client(secret, api_key=key).models()
        assert "s3cret" not in str(info.value) and info.value.key_given is (key is not None)


# --- replies: numbers, shapes, the server's words ----------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "[1, {\"a\": 2e308}]"])
def test_a_number_that_is_not_finite_is_a_bad_reply(text):
    with pytest.raises(ServerBadReply) as info:
        read_json(text.encode(), "http://h:1/x")
    assert "not a JSON number" in str(info.value) or "too large to be finite" in str(info.value)


@PROPERTY
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                          | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3), max_leaves=8))
def test_finite_json_reads_back_as_sent(value):
    assert read_json(json.dumps(value).encode(), "http://h:1/x") == value


@pytest.mark.parametrize("value", [True, "1.5", -0.5, None, [], {}, 10 ** 400, "NaN"])
def test_get_ppl_takes_only_a_finite_non_negative_loss(scripted, value):
    scripted.replies[("POST", "/get_ppl")] = (200, json.dumps({"ppl": value}).encode())
    with pytest.raises(ServerBadReply, match="no finite non-negative number 'ppl'"):
        Client(scripted.url).ppl([1, 2])
    scripted.replies[("POST", "/get_ppl")] = (200, b'{"ppl": 2}')
    assert Client(scripted.url).ppl([1, 2]) == 2.0 and json.loads(scripted.seen[-1][3]) == {"input": [1, 2]}


@PROPERTY
@given(text=st.text(max_size=40), where=st.sampled_from(["detail", "message", "error", "envelope", "proxy", "401"]))
def test_whatever_words_the_server_sends_the_client_gives_them_back_printable(scripted, text, where):
    status, payload = {"detail": (500, {"detail": text}), "message": (400, {"message": text, "object": "error"}),
                       "error": (200, {"error": {"message": text, "code": text}}),
                       "envelope": (200, {"object": "error", "message": text, "code": text}),
                       "proxy": (200, {"error_code": 10402, "text": text}), "401": (401, {"detail": text})}[where]
    scripted.replies[("POST", "/v1/chat/completions")] = (status, body(payload))
    with pytest.raises((ServerHTTPError, ServerErrorBody, ServerUnauthorized)) as info:
        Client(scripted.url, api_key="k").chat("m", "hi", 4)
    facts = [str(v) for v in info.value.facts().values()]
    assert all(fact.isprintable() for fact in facts), facts
    assert str(info.value).isprintable()


def test_an_error_status_and_an_error_body_carry_the_servers_message(scripted):
    scripted.replies[("POST", "/v1/encode")] = (500, body({"detail": "boom\x1b[31mRED\nSECOND LINE"}))
    with pytest.raises(ServerHTTPError) as info:
        Client(scripted.url).encode("x")
    assert (info.value.status, info.value.detail) == (500, "boom\\x1b[31mRED\\nSECOND LINE")
    scripted.replies[("POST", "/v1/encode")] = (200, body({"error_code": 10402, "text": "Failed to get response"}))
    with pytest.raises(ServerErrorBody) as info:
        Client(scripted.url).encode("x")
    assert (info.value.code, info.value.detail) == ("10402", "Failed to get response")
    assert info.value.url == scripted.url + "/v1/encode"


# --- health --------------------------------------------------------------------------------------------


def test_health_answers_with_the_status_or_why_nothing_answered(scripted):
    closed = f"http://127.0.0.1:{free_ports(1)}"
    scripted.replies[("GET", "/health")] = (503, b'{"detail": "initializing"}')
    assert (check_health(scripted.url).status, check_health(scripted.url).detail) == (503, "HTTP 503")
    assert health_status(scripted.url + "/health") == 503
    scripted.replies[("GET", "/health")] = (200, b"")
    assert check_health(scripted.url).ok and health_status(scripted.url + "/health") == 200
    assert (check_health(closed).status, check_health(closed).detail) == (None, "connection refused")
    assert health_status(closed + "/health", timeout=1) is None
    every = check_health_all([scripted.url, closed, scripted.url], timeout=2)
    assert list(every) == [scripted.url, closed] and every[scripted.url].ok and not every[closed].ok


@pytest.mark.parametrize("entry", ["not a url", "http://h:1/a b", "http://h:1/\u00fc", "ftp://x:1", "http://h:99999",
                                   "http://h\x1b[31m:1", "http://h:1/\x9b31m"])
def test_a_node_entry_that_is_no_url_is_unhealthy_with_a_printable_reason(entry):
    """lmdeploy's node API takes any string: each is a reason, never an exception (``proxy status``
    checks every entry)."""
    health = check_health(entry, timeout=1)
    assert health.status is None and health.detail.startswith("not a URL launch can reach")
    assert health.detail.isprintable() and health.url == entry  # the entry as registered, to be sent back


def test_served_models_is_empty_unless_the_server_lists_model_names(scripted):
    scripted.replies[("GET", "/v1/models")] = (200, MODELS)
    assert served_models(scripted.url, "k") == ["b", "a"]
    for status, reply in [(401, b"{}"), (500, b"{}"), (200, b'{"data": [{"id": 3}]}'), (200, b'{"data": [{"id": NaN}]}'),
                          (200, b"not json"), (200, b'{"data": [{"id": " "}]}')]:
        scripted.replies[("GET", "/v1/models")] = (status, reply)
        assert served_models(scripted.url) == []
    assert served_models(f"http://127.0.0.1:{free_ports(1)}", timeout=1) == []


# --- the proxy's node API ----------------------------------------------------------------------------


def test_the_node_list_is_read_whatever_urls_were_registered(scripted):
    """lmdeploy's node API takes any string as a URL: a node registered as ``error_code`` or ``error``
    does not make the whole list look like an error envelope."""
    listed = {"http://h:1": {"models": ["m"], "unfinished": 2, "latency": [], "speed": None},
              "error_code": {"models": ["m"], "unfinished": -1}, "error": None, "object": {"models": []}}
    scripted.replies[("GET", "/nodes/status")] = (200, body(listed))
    nodes = Client(scripted.url).nodes()
    assert {url: (n.models, n.unfinished) for url, n in nodes.items()} == {
        "http://h:1": (("m",), 2), "error_code": (("m",), -1), "error": ((), 0), "object": ((), 0)}


@pytest.mark.parametrize("listed", [[], "x", {"u": []}, {"u": {"models": "m"}}, {"u": {"models": [1]}},
                                    {"u": {"unfinished": "3"}}, {"u": {"unfinished": True}},
                                    {"u": {"unfinished": 1.5}}])
def test_a_node_list_of_another_shape_is_a_bad_reply(scripted, listed):
    scripted.replies[("GET", "/nodes/status")] = (200, body(listed))
    with pytest.raises(ServerBadReply):
        Client(scripted.url).nodes()


def test_adding_and_removing_a_node(scripted):
    scripted.replies[("POST", "/nodes/add")] = (200, body("Added successfully"))
    scripted.replies[("POST", "/nodes/remove")] = (200, body("Deleted successfully"))
    client = Client(scripted.url)
    client.add_node("http://h:1", ("m",))
    client.remove_node("http://h:1")
    assert [(m, p, json.loads(b)) for m, p, _, b in scripted.seen] == [
        ("POST", "/nodes/add", {"url": "http://h:1", "status": {"models": ["m"]}}),
        ("POST", "/nodes/remove", {"url": "http://h:1"})]
    for reply, error in [(body("Failed to add, \x1b[2J please check the input url."), ServerRefused),
                         (body({"ok": True}), ServerRefused),
                         (body({"error_code": 4, "text": "bad\nnode"}), ServerErrorBody),
                         (b"Added successfully", ServerBadReply)]:
        scripted.replies[("POST", "/nodes/add")] = (200, reply)
        with pytest.raises(error) as info:
            client.add_node("http://h:1", ("m",))
        assert str(info.value).isprintable() and "\n" not in str(info.value)
