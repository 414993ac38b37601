"""A small OpenAI-compatible HTTP client on urllib: /v1/models, /v1/chat/completions, tokenize.

Standard library only, so the probe can run against any server (lmdeploy, vLLM, SGLang) from a
machine without the serving stack. Every call has a timeout. Transport failures become the typed
errors of ``launcher.errors`` (unreachable, 401, HTTP error with the server's own message, timeout),
so callers decide which are fatal and which only spoil one trial.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..errors import (
    BadOption,
    ProbeBadReply,
    ProbeHTTPError,
    ProbeTimeout,
    ProbeUnauthorized,
    ProbeUnreachable,
)

DEFAULT_URL = "http://127.0.0.1:23333"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def normalize_url(url: str) -> str:
    """``host:port``, ``http://host:port/`` and ``.../v1`` all become ``http://host:port``."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadOption("--url", url, "give an http(s) address such as http://127.0.0.1:23333")
    try:
        _ = parts.port
    except ValueError:
        raise BadOption("--url", url, "the port is not a number between 0 and 65535") from None
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float


def _detail(body: bytes) -> str:
    """The server's own error message from lmdeploy's, OpenAI's or FastAPI's error JSON."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])
    return text[:300]


class OpenAIClient:
    """Talks to one server. ``api_key`` goes out as ``Authorization: Bearer``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = normalize_url(url)
        self.api_key = api_key or None
        self.timeout = timeout
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A proxy from the environment would turn a local server into an unreachable one.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        url = self.url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raw = err.read() if err.fp is not None else b""
            if err.code == 401:
                raise ProbeUnauthorized(self.url, self.api_key is not None) from None
            raise ProbeHTTPError(url, err.code, _detail(raw)) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise ProbeTimeout(url, self.timeout) from None
            reason = err.reason.strerror if isinstance(err.reason, OSError) and err.reason.strerror else err.reason
            raise ProbeUnreachable(self.url, str(reason).lower()) from None
        except TimeoutError:
            raise ProbeTimeout(url, self.timeout) from None
        except (http.client.HTTPException, ConnectionError) as err:
            raise ProbeUnreachable(self.url, f"the connection broke ({type(err).__name__})") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ProbeBadReply(url, f"the body is not JSON: {raw[:80]!r}") from None

    def models(self) -> list[str]:
        """The model ids of ``GET /v1/models``, in the server's order."""
        data = self._call("GET", "/v1/models")
        try:
            return [str(card["id"]) for card in data["data"]]
        except (KeyError, TypeError):
            raise ProbeBadReply(self.url + "/v1/models", "no data[].id in the reply") from None

    def chat(self, model: str, prompt: str, max_tokens: int) -> ChatReply:
        """One user message, greedy decoding (temperature 0), no streaming."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": False,
        }
        start = time.monotonic()
        data = self._call("POST", "/v1/chat/completions", body)
        latency = time.monotonic() - start
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ProbeBadReply(self.url + "/v1/chat/completions", "no choices[0].message in the reply") from None
        # Reasoning models may leave the answer only in reasoning_content when max_tokens runs out.
        text = message.get("content") or message.get("reasoning_content") or ""
        usage = data.get("usage") or {}
        return ChatReply(str(text), _int_or_none(usage.get("prompt_tokens")),
                         _int_or_none(usage.get("completion_tokens")), latency)

    def encode(self, text: str) -> int:
        """Token count from lmdeploy's ``POST /v1/encode`` (raw text, no BOS, no chat template)."""
        data = self._call("POST", "/v1/encode", {"input": text, "add_bos": False})
        length = data.get("length") if isinstance(data, dict) else None
        if not isinstance(length, int):
            raise ProbeBadReply(self.url + "/v1/encode", "no integer 'length' in the reply")
        return length

    def tokenize(self, model: str, text: str) -> int:
        """Token count from vLLM's ``POST /tokenize`` (``{"count": N, ...}``)."""
        data = self._call("POST", "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            raise ProbeBadReply(self.url + "/tokenize", "no integer 'count' in the reply")
        return count


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None
