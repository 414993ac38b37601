"""A small client for the endpoints of an OpenAI-compatible / lmdeploy server, on ``launcher.http``.

``launcher.http`` gives every request one overall deadline (a server that accepts and never answers,
or sends one byte a second, ends at ``timeout``), sends ``user:password@`` as Basic auth and never
shows it. Here its replies become answers or the typed errors of ``launcher.errors`` (401, HTTP
error with the server's own message, an error body sent with HTTP 200, a reply of the wrong
shape), so callers decide which are fatal and which only spoil one trial. ``http.Unreachable`` and
``http.DeadlineExceeded`` pass through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .. import http
from ..errors import ProbeBadReply, ProbeErrorBody, ProbeHTTPError, ProbeUnauthorized

DEFAULT_URL = "http://127.0.0.1:23333"
WAITING_NOTICE_S = 1.0  # a first request still unanswered after this is said on stderr


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
        if not reply.ok:
            raise ProbeHTTPError(shown, reply.status, reply.detail())
        try:
            data = reply.json()
        except ValueError:
            raise ProbeBadReply(shown, f"the body is not JSON: {reply.body[:80]!r}") from None
        error = error_in_body(data)
        if error is not None:
            raise ProbeErrorBody(shown, *error)
        return data

    def models(self) -> list[str]:
        """The model ids of ``GET /v1/models``, in the server's order."""
        data = self.call("GET", "/v1/models")
        try:
            return [str(card["id"]) for card in data["data"]]
        except (KeyError, TypeError):
            raise ProbeBadReply(self.shown + "/v1/models", "no data[].id in the reply") from None

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
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ProbeBadReply(self.shown + "/v1/chat/completions", "no choices[0].message in the reply") from None
        # Reasoning models may leave the answer only in reasoning_content when max_tokens runs out.
        text = message.get("content") or message.get("reasoning_content") or ""
        usage = data.get("usage") or {}
        return ChatReply(str(text), _int_or_none(usage.get("prompt_tokens")),
                         _int_or_none(usage.get("completion_tokens")), latency)

    def encode_ids(self, text: str) -> list[int]:
        """Token ids from lmdeploy's ``POST /v1/encode`` (raw text, no BOS, no chat template)."""
        data = self.call("POST", "/v1/encode", {"input": text, "add_bos": False})
        ids = data.get("input_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ProbeBadReply(self.shown + "/v1/encode", "no list of integer 'input_ids' in the reply")
        return ids

    def encode(self, text: str) -> int:
        """Token count from lmdeploy's ``POST /v1/encode`` (raw text, no BOS, no chat template)."""
        data = self.call("POST", "/v1/encode", {"input": text, "add_bos": False})
        length = data.get("length") if isinstance(data, dict) else None
        if not isinstance(length, int):
            raise ProbeBadReply(self.shown + "/v1/encode", "no integer 'length' in the reply")
        return length

    def tokenize(self, model: str, text: str) -> int:
        """Token count from vLLM's ``POST /tokenize`` (``{"count": N, ...}``)."""
        data = self.call("POST", "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            raise ProbeBadReply(self.shown + "/tokenize", "no integer 'count' in the reply")
        return count


def _now() -> float:
    import time

    return time.monotonic()


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


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
