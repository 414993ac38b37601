"""A small client for the endpoints of an OpenAI-compatible / lmdeploy server, on ``launcher.net.http``.

``launcher.net.http`` gives every request one overall deadline (a server that accepts and never answers,
or sends one byte a second, ends at ``timeout``), sends ``user:password@`` as Basic auth and never
shows it. Here its replies become answers or the typed errors of ``launcher.errors`` (401, HTTP
error with the server's own message, an error body sent with HTTP 200, a reply of the wrong
shape), so callers decide which are fatal and which only spoil one trial. ``http.Unreachable`` and
``http.DeadlineExceeded`` pass through.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from launcher.errors import LaunchError, printable
from launcher.net import http


class ProbeUnauthorized(LaunchError):
    url: str
    key_given: bool

    def message(self) -> str:
        if self.key_given:
            return f"{self.url} rejected the API key (HTTP 401). Check --api-key or LAUNCH_API_KEY."
        return f"{self.url} needs an API key (HTTP 401): pass --api-key or set LAUNCH_API_KEY."


class ProbeHTTPError(LaunchError):
    """The server answered with an HTTP error; ``detail`` is its own message."""

    url: str
    status: int
    detail: str
    message = "{url} answered HTTP {status}: {detail}"


class ProbeErrorBody(LaunchError):
    """HTTP 200 whose body is an error, not an answer (lmdeploy's proxy: ``{"error_code": 10402, "text": ...}``
    while a dead node is still registered)."""

    url: str
    code: str
    detail: str
    message = "{url} answered with an error instead of a result (error_code {code}): {detail}"


class ProbeBadReply(LaunchError):
    """The server answered 200 with something that is not the expected JSON shape."""

    url: str
    problem: str
    message = "{url} did not answer like an lmdeploy / OpenAI-compatible server: {problem}"


DEFAULT_URL = "http://127.0.0.1:23333"
WAITING_NOTICE_S = 1.0  # a first request still unanswered after this is said on stderr
STUCK_AFTER = 3  # requests in a row past their deadline: the engine is stuck and the run stops


def normalize_url(url: str) -> str:
    """``host:port``, ``http://host:port/`` and ``.../v1`` all become ``http://host:port``
    (credentials kept: they are sent as Basic auth; show the URL only through ``http.redact``)."""
    target = http.parse_url(url, option="--url")
    path = target.path.split("?", 1)[0].rstrip("/").removesuffix("/v1")
    netloc = url.strip().split("://", 1)[-1].split("/", 1)[0]  # as given, with any user:password@
    return f"{target.scheme}://{netloc}{path}"


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float


def error_in_body(data: Any) -> tuple[str, str] | None:
    """``(code, text)`` when a 200 reply is an error envelope instead of an answer: lmdeploy's proxy
    (``{"error_code": 10402, "text": "..."}``) or an OpenAI ``{"error": ...}`` / ``{"object": "error"}``."""
    if not isinstance(data, dict):
        return None
    if "error_code" in data and data.get("error_code") not in (0, None):
        return str(data["error_code"]), str(data.get("text") or data.get("message") or "")[:300]
    if data.get("object") == "error":
        return str(data.get("code", "?")), str(data.get("message") or "")[:300]
    error = data.get("error")
    if error and "choices" not in data:
        if isinstance(error, dict):
            return str(error.get("code", "?")), str(error.get("message") or error)[:300]
        return "?", str(error)[:300]
    return None


class OpenAIClient:
    """Talks to one server. ``api_key`` goes out as ``Authorization: Bearer``; ``timeout`` bounds
    each request as a whole."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = normalize_url(url)
        self.shown = http.redact(self.url)
        self.api_key = api_key or None
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """The JSON answer of ``method path``, or one of the typed errors."""
        reply = http.request(method, self.url + path, json_body=body, api_key=self.api_key, timeout=self.timeout)
        shown = self.shown + path
        if reply.status == 401:
            raise ProbeUnauthorized(self.shown, self.api_key is not None)
        if not reply.ok:  # the server's own words, made printable: they reach the terminal
            raise ProbeHTTPError(shown, reply.status, printable(reply.detail()))
        try:
            data = json.loads(reply.body, parse_constant=_not_a_number)
        except _NonFinite as err:
            raise ProbeBadReply(shown, f"the reply holds {err}, which is not a JSON number") from None
        except (ValueError, RecursionError):
            raise ProbeBadReply(shown, f"the body is not JSON: {reply.body[:80]!r}") from None
        error = error_in_body(data)
        if error is not None:
            raise ProbeErrorBody(shown, *(printable(part) for part in error))
        return data

    def models(self) -> list[str]:
        """The model ids of ``GET /v1/models``, in the server's order (each a non-empty string)."""
        data = self.call("GET", "/v1/models")
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise ProbeBadReply(self.shown + "/v1/models", "no data[] list of models in the reply")
        ids = [card.get("id") if isinstance(card, dict) else None for card in cards]
        if not all(isinstance(i, str) and i.strip() for i in ids):
            raise ProbeBadReply(self.shown + "/v1/models", "a data[].id is not a model name (a non-empty string)")
        return ids

    def chat(self, model: str, prompt: str, max_tokens: int) -> ChatReply:
        """One user message, greedy decoding (temperature 0), no streaming."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": False,
        }
        reply_start = _now()
        data = self.call("POST", "/v1/chat/completions", body)
        latency = _now() - reply_start
        shown = self.shown + "/v1/chat/completions"
        choices = data.get("choices") if isinstance(data, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(message, dict):
            raise ProbeBadReply(shown, "no choices[0].message in the reply")
        for name in ("content", "reasoning_content"):
            if message.get(name) is not None and not isinstance(message[name], str):
                raise ProbeBadReply(shown, f"choices[0].message.{name} is {type(message[name]).__name__}, not text")
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
            raise ProbeBadReply(self.shown + "/v1/encode", "no list of integer 'input_ids' in the reply")
        return ids

    def encode(self, text: str) -> int:
        """Token count from lmdeploy's ``POST /v1/encode`` (raw text, no BOS, no chat template)."""
        data = self.call("POST", "/v1/encode", {"input": text, "add_bos": False})
        length = _count_or_none(data.get("length") if isinstance(data, dict) else None)
        if length is None:
            raise ProbeBadReply(self.shown + "/v1/encode", "no integer 'length' in the reply")
        return length

    def tokenize(self, model: str, text: str) -> int:
        """Token count from vLLM's ``POST /tokenize`` (``{"count": N, ...}``)."""
        data = self.call("POST", "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
        count = _count_or_none(data.get("count") if isinstance(data, dict) else None)
        if count is None:
            raise ProbeBadReply(self.shown + "/tokenize", "no integer 'count' in the reply")
        return count


def _now() -> float:
    import time

    return time.monotonic()


def _count_or_none(value: object) -> int | None:
    """A whole number >= 0 from a reply (a token count or id); None for anything else (true, 1.5)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class _NonFinite(ValueError):
    pass


def _not_a_number(name: str) -> float:
    """Python's json reads NaN and Infinity; no JSON server sends them, so a reply holding one is bad."""
    raise _NonFinite(name)


class EngineStuck(LaunchError):
    """Several requests in a row ran past their deadline: the run stops instead of waiting out
    every remaining one (hours at the defaults)."""

    url: str
    misses: int
    seconds: float
    exit_code = 3
    message = ("{url} left {misses} requests in a row unanswered within the {seconds:g} s deadline: the engine looks "
               "stuck, so the run stopped (the results so far are written). Restart the server, or give a longer "
               "--timeout if prompts this long need it.")


class StuckWatch:
    """Counts requests in a row that ran past their deadline; any answer (an error status too) resets it."""

    def __init__(self, client: OpenAIClient) -> None:
        self.client = client
        self.misses = 0

    def after(self, error: LaunchError | None) -> EngineStuck | None:
        """Call after each trial or window with its error (None: answered); an ``EngineStuck`` to stop on."""
        self.misses = self.misses + 1 if isinstance(error, http.DeadlineExceeded) else 0
        if self.misses >= STUCK_AFTER:
            return EngineStuck(self.client.shown, self.misses, self.client.timeout)
        return None


@contextmanager
def waiting_notice(client: OpenAIClient, say: Callable[[str], None]) -> Iterator[None]:
    """Around a run's first requests: ``say`` one line when they are still unanswered after
    ``WAITING_NOTICE_S``, so a server that accepts and says nothing still gets a line within a
    second (the deadline is ``client.timeout``); a quick refusal stays the one error line."""
    timer = threading.Timer(WAITING_NOTICE_S, lambda: say(
        f"waiting for {client.shown} (each request has a {client.timeout:g} s deadline) ..."))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
