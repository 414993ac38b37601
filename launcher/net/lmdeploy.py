"""The one client for lmdeploy's endpoints, on launch's one HTTP client (``launcher.net.http``: one
deadline per request, loopback never proxied, ``user:password@`` sent as Basic auth, never shown).

What lmdeploy 0.18 serves, and what this module knows of it once:

- the api_server: ``GET /health`` (200 when ready, 503 while loading; no key needed),
  ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/encode``, ``POST /get_ppl``
  (vLLM's ``POST /tokenize`` too: a token counter for other servers);
- its proxy: ``GET /nodes/status``, ``POST /nodes/add``, ``POST /nodes/remove`` (answered with a
  JSON string, "Added successfully" or "Failed to add, ..."; no key needed);
- URLs: ``host:port``, ``.../`` and ``.../v1`` all name the server's root (``normalize_url``);
  every URL in a message goes through ``http.redact``;
- the API key goes out as ``Authorization: Bearer``; a 401 is ``ServerUnauthorized``;
- replies: JSON holding finite numbers only (``NaN``, ``Infinity``, ``1e999`` are refused), in each
  endpoint's shape, or ``ServerBadReply``; an HTTP error is ``ServerHTTPError`` with the server's own
  words (the ``detail`` / ``message`` of its error JSON); HTTP 200 carrying an error envelope (the
  proxy's ``{"error_code": 10402, "text": ...}`` while a dead node is still registered) is
  ``ServerErrorBody``. ``http.Unreachable`` and ``http.DeadlineExceeded`` pass through.

Words for a person from the server (an error's detail or code, a health detail) come back printable:
one line, control characters escaped. Names (model ids, node URLs) come back as sent, since launch sends
them back; whoever shows one shows it printable. Callers say the errors in their own context.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from launcher.errors import LaunchError, printable
from launcher.net import http

DEFAULT_URL = "http://127.0.0.1:23333"
POLL_S = 0.25  # how often a waiting caller asks /health again
HEALTH_TIMEOUT_S = 2.0  # one /health request


class ServerUnauthorized(LaunchError):
    url: str
    key_given: bool
    detail: str = ""  # the server's own words

    def message(self) -> str:
        if self.key_given:
            return f"{self.url} rejected the API key (HTTP 401). Check --api-key or LAUNCH_API_KEY."
        return f"{self.url} needs an API key (HTTP 401): pass --api-key or set LAUNCH_API_KEY."


class ServerHTTPError(LaunchError):
    """The server answered with an HTTP error; ``detail`` is its own message."""

    url: str
    status: int
    detail: str
    message = "{url} answered HTTP {status}: {detail}"


class ServerErrorBody(LaunchError):
    """HTTP 200 whose body is an error, not an answer (lmdeploy's proxy: ``{"error_code": 10402, "text": ...}``
    while a dead node is still registered)."""

    url: str
    code: str
    detail: str
    message = "{url} answered with an error instead of a result (error_code {code}): {detail}"


class ServerBadReply(LaunchError):
    """The server answered 200 with something that is not the expected JSON shape."""

    url: str
    problem: str
    message = "{url} did not answer like an lmdeploy / OpenAI-compatible server: {problem}"


class ServerRefused(LaunchError):
    """The proxy's node API answered 200 with its own words of failure ("Failed to add, ...")."""

    url: str
    detail: str
    message = "{url} did not do it: {detail}"


# --- URLs --------------------------------------------------------------------------------------


def normalize_url(url: str, option: str = "--url") -> str:
    """``host:port``, ``http://host:port/`` and ``.../v1`` all become ``http://host:port`` (a path
    prefix such as ``/llm`` is kept; a query or fragment is dropped; credentials kept: they are sent
    as Basic auth; show the URL only through ``http.redact``). ``BadOption(option, ...)`` otherwise."""
    target = http.parse_url(url, option=option)
    text = url.strip()
    netloc = re.split(r"[/?#]", text.split("://", 1)[-1], maxsplit=1)[0]  # as urlsplit cuts it, user:password@ too
    path = target.path.split("?", 1)[0].rstrip("/").removesuffix("/v1")
    return f"{target.scheme}://{netloc}{path}"


def health_url_for(url: str) -> str:
    """``/health`` of the server at ``url``: its root, its ``/v1`` base URL, or the health URL."""
    url = url.rstrip("/")
    if url.endswith("/health"):
        return url
    return url.removesuffix("/v1") + "/health"


# --- replies -----------------------------------------------------------------------------------


class _NonFinite(ValueError): ...


def _no_constant(name: str) -> float:
    """Python's json reads NaN and Infinity; no JSON server sends them, so a reply holding one is bad."""
    raise _NonFinite(f"{name}, which is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a JSON number Python reads as infinity
        raise _NonFinite(f"the number {text[:40]}, which is too large to be finite")
    return value


def read_json(body: bytes, shown: str) -> Any:
    """``body`` as JSON with finite numbers only, or ``ServerBadReply`` naming ``shown``."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except _NonFinite as err:
        raise ServerBadReply(shown, f"the reply holds {err}") from None
    except (ValueError, RecursionError):
        raise ServerBadReply(shown, f"the body is not JSON: {body[:80]!r}") from None


def error_in_body(data: Any) -> tuple[str, str] | None:
    """``(code, text)``, printable, when a 200 reply is an error envelope instead of an answer: lmdeploy's
    proxy (``{"error_code": 10402, "text": "..."}``) or an OpenAI ``{"error": ...}`` / ``{"object": "error"}``."""
    if not isinstance(data, dict):
        return None
    found = None
    if "error_code" in data and data.get("error_code") not in (0, None):
        found = data["error_code"], data.get("text") or data.get("message") or ""
    elif data.get("object") == "error":
        found = data.get("code", "?"), data.get("message") or ""
    elif data.get("error") and "choices" not in data:
        error = data["error"]
        found = (error.get("code", "?"), error.get("message") or error) if isinstance(error, dict) else ("?", error)
    return None if found is None else (printable(str(found[0])[:40]), printable(str(found[1])[:300]))


def _count_or_none(value: object) -> int | None:
    """A whole number >= 0 from a reply (a token count or id); None for anything else (true, 1.5)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _finite_or_none(value: object) -> float | None:
    """A finite number from a reply as a float; None for anything else (true, "1", an int past float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # 10**400: a JSON integer no float holds
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float


@dataclass(frozen=True)
class Node:
    """One node as lmdeploy's proxy lists it (``url`` and ``models`` as registered, to be sent back)."""

    url: str
    models: tuple[str, ...]
    # requests in flight; lmdeploy's count can go below 0 after a re-add; None: the router does not know
    # (launch's front of vllm-router: lmdeploy's api_server answers vllm-router's load query with -1)
    unfinished: int | None = 0


@dataclass(frozen=True)
class Health:
    """The answer of one ``GET /health``: ``ok`` only for HTTP 200."""

    url: str
    status: int | None  # None: nothing answered in time, or no URL launch can reach
    detail: str  # "healthy", "HTTP 503", "connection refused", "no answer within 2 s"; printable

    @property
    def ok(self) -> bool:
        return self.status == 200


# --- one server --------------------------------------------------------------------------------


class Client:
    """Talks to one lmdeploy api_server or proxy at ``url`` (normalised by ``normalize_url``).
    ``api_key`` goes out as ``Authorization: Bearer``; ``timeout`` bounds each request as a whole."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, *, option: str = "--url") -> None:
        self.url = normalize_url(url, option)
        self.shown = http.redact(self.url)
        self.api_key = api_key or None
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, *, envelope: bool = True) -> Any:
        """The JSON answer of ``method path``, or one of the typed errors. ``envelope``: a 200 reply
        shaped as an error envelope is ``ServerErrorBody`` (not for a node list, keyed by any string)."""
        reply = http.request(method, self.url + path, json_body=body, api_key=self.api_key, timeout=self.timeout)
        shown = self.shown + path
        if reply.status == 401:
            raise ServerUnauthorized(self.shown, self.api_key is not None, printable(reply.detail()))
        if not reply.ok:  # the server's own words, printable: they reach the terminal
            raise ServerHTTPError(shown, reply.status, printable(reply.detail()))
        data = read_json(reply.body, shown)
        error = error_in_body(data) if envelope else None
        if error is not None:
            raise ServerErrorBody(shown, *error)
        return data

    def _bad(self, path: str, problem: str) -> ServerBadReply:
        return ServerBadReply(self.shown + path, problem)

    # -- the api_server -------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The model ids of ``GET /v1/models``, in the server's order (each a non-empty string)."""
        data = self.call("GET", "/v1/models")
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise self._bad("/v1/models", "no data[] list of models in the reply")
        ids = [card.get("id") if isinstance(card, dict) else None for card in cards]
        if not all(isinstance(i, str) and i.strip() for i in ids):
            raise self._bad("/v1/models", "a data[].id is not a model name (a non-empty string)")
        return ids

    def chat(self, model: str, prompt: str, max_tokens: int) -> ChatReply:
        """One user message, greedy decoding (temperature 0), no streaming."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens, "stream": False}
        started = time.monotonic()
        data = self.call("POST", "/v1/chat/completions", body)
        latency = time.monotonic() - started
        choices = data.get("choices") if isinstance(data, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(message, dict):
            raise self._bad("/v1/chat/completions", "no choices[0].message in the reply")
        for name in ("content", "reasoning_content"):
            if message.get(name) is not None and not isinstance(message[name], str):
                raise self._bad("/v1/chat/completions",
                                f"choices[0].message.{name} is {type(message[name]).__name__}, not text")
        # Reasoning models may leave the answer only in reasoning_content when max_tokens runs out.
        text = message.get("content") or message.get("reasoning_content") or ""
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ChatReply(text, _count_or_none(usage.get("prompt_tokens")),
                         _count_or_none(usage.get("completion_tokens")), latency)

    def encode_ids(self, text: str) -> list[int]:
        """Token ids from lmdeploy's ``POST /v1/encode`` (raw text, no BOS, no chat template)."""
        data = self.call("POST", "/v1/encode", {"input": text, "add_bos": False})
        ids = data.get("input_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not all(_count_or_none(i) is not None for i in ids):
            raise self._bad("/v1/encode", "no list of integer 'input_ids' in the reply")
        return ids

    def encode(self, text: str) -> int:
        """Token count from lmdeploy's ``POST /v1/encode`` (raw text, no BOS, no chat template)."""
        data = self.call("POST", "/v1/encode", {"input": text, "add_bos": False})
        length = _count_or_none(data.get("length") if isinstance(data, dict) else None)
        if length is None:
            raise self._bad("/v1/encode", "no integer 'length' in the reply")
        return length

    def tokenize(self, model: str, text: str) -> int:
        """Token count from vLLM's ``POST /tokenize`` (``{"count": N, ...}``)."""
        data = self.call("POST", "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
        count = _count_or_none(data.get("count") if isinstance(data, dict) else None)
        if count is None:
            raise self._bad("/tokenize", "no integer 'count' in the reply")
        return count

    def ppl(self, ids: list[int]) -> float:
        """lmdeploy's ``POST /get_ppl`` for token ids: the mean next-token loss (``{"ppl": float}``;
        a loss, not exp(loss))."""
        data = self.call("POST", "/get_ppl", {"input": ids})
        value = data.get("ppl") if isinstance(data, dict) else None
        loss = _finite_or_none(value)
        if loss is None or loss < 0:
            raise self._bad("/get_ppl", "no finite non-negative number 'ppl' in the reply")
        return loss

    # -- the proxy's node API -------------------------------------------------------------------
    def nodes(self) -> dict[str, Node]:
        """The proxy's nodes (``GET /nodes/status``), by URL as registered."""
        data = self.call("GET", "/nodes/status", envelope=False)  # keys are whatever anyone registered
        if not isinstance(data, dict):
            raise self._bad("/nodes/status", "not lmdeploy's node list (an object by node URL)")
        nodes = {}
        for url, status in data.items():
            status = {} if status is None else status
            models = (status.get("models") or []) if isinstance(status, dict) else None
            unfinished = status.get("unfinished", 0) if isinstance(status, dict) else "?"
            if (not isinstance(models, list) or not all(isinstance(m, str) for m in models)
                    or not (unfinished is None or isinstance(unfinished, int)) or isinstance(unfinished, bool)):
                raise self._bad("/nodes/status", "a node's status is not lmdeploy's ({models: [names], "
                                                 "unfinished: count})")
            nodes[url] = Node(url, tuple(models), unfinished)
        return nodes

    def add_node(self, url: str, models: Iterable[str]) -> None:
        """``POST /nodes/add`` with the models filled in (the proxy then registers without probing)."""
        self._node_call("/nodes/add", {"url": url, "status": {"models": list(models)}})

    def remove_node(self, url: str) -> None:
        """``POST /nodes/remove``."""
        self._node_call("/nodes/remove", {"url": url})

    def _node_call(self, path: str, body: dict) -> None:
        answer = self.call("POST", path, body)
        # lmdeploy answers 200 with a plain JSON string, its failures too ("Failed to add, ...")
        if not isinstance(answer, str) or "success" not in answer.lower():
            raise ServerRefused(self.shown + path, printable(str(answer)[:300]))


# --- health, for the supervisor and the proxy tools --------------------------------------------


def _health_at(url: str, health_url: str, timeout: float) -> Health:
    try:
        reply = http.get(health_url, timeout=timeout)
    except http.DeadlineExceeded:
        return Health(url, None, f"no answer within {timeout:g} s")
    except http.Unreachable as err:
        return Health(url, None, printable(err.reason))
    except LaunchError as err:  # BadOption from parse_url: "not a url", ftp://..., port 99999
        return Health(url, None, printable(f"not a URL launch can reach ({getattr(err, 'reason', err)})"))
    return Health(url, reply.status, "healthy" if reply.status == 200 else f"HTTP {reply.status}")


def check_health(url: str, timeout: float = HEALTH_TIMEOUT_S) -> Health:
    """``GET url/health`` (``url`` a server's root as given: a node URL the proxy holds) within
    ``timeout`` seconds. A URL that is no http(s) address (lmdeploy's node API takes any string) is
    unhealthy, with the reason."""
    return _health_at(url, http.join(url, "/health"), timeout)


def check_health_all(urls: Iterable[str], timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Health]:
    """``check_health`` of every URL at once, one thread each: a node that hangs costs ``timeout``
    and does not delay the others' answers."""
    urls = list(dict.fromkeys(urls))
    results = {url: Health(url, None, f"no answer within {timeout:g} s") for url in urls}

    def one(url: str) -> None:
        try:
            results[url] = check_health(url, timeout)  # each thread writes its own key
        except Exception as err:  # noqa: BLE001 - one odd node must not print a thread traceback
            results[url] = Health(url, None, f"the check failed ({type(err).__name__})")

    threads = [threading.Thread(target=one, args=(url,), name=f"health {http.redact(url)}", daemon=True)
               for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1.0)  # http.get ends by its own deadline; this is only a backstop
    return dict(results)


def health_status(url: str, timeout: float = HEALTH_TIMEOUT_S) -> int | None:
    """HTTP status of ``GET url`` (a health URL), or ``None`` when nothing answers within ``timeout``
    (port closed, connection reset): that is how a server still loading its weights looks."""
    return _health_at(url, url, timeout).status


def wait_healthy(url: str, timeout: float, *, interval: float = POLL_S) -> bool:
    """Poll ``/health`` of the server at ``url`` (root, ``/v1`` base or health URL) until it answers
    200; ``True`` then, ``False`` once ``timeout`` seconds have passed. For the smoke test and probes;
    the supervisor also watches the process while it waits."""
    health = health_url_for(url)
    deadline = time.monotonic() + timeout
    while True:
        if health_status(health, timeout=max(0.1, min(HEALTH_TIMEOUT_S, deadline - time.monotonic()))) == 200:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def served_models(root_url: str, api_key: str | None = None, timeout: float = 5.0) -> list[str]:
    """Model ids from ``GET /v1/models`` (empty if it does not answer as expected)."""
    try:
        return Client(root_url, api_key, timeout).models()
    except LaunchError:
        return []
