"""The one HTTP client of launch: JSON requests with one overall deadline each.

Used by ``launcher.net.lmdeploy`` (the one client of lmdeploy's endpoints: the supervisor's, probe's,
ppl's and the proxy tools') and the smoke script. Standard library only, so it starts fast and runs anywhere.

- One deadline per request, covering connect, headers and the whole body: a server that accepts
  and never answers, or sends one byte a second, ends at ``timeout`` (the request runs in a daemon
  thread; on expiry its socket is shut down). Ctrl-C interrupts the wait at once.
- Loopback addresses never go through an HTTP proxy from the environment; other hosts honour
  ``http_proxy`` / ``https_proxy`` / ``no_proxy`` as urllib does.
- ``user:password@`` in a URL is sent as Basic auth and never shown: every URL in a message goes
  through ``redact``.
- Transport failures are typed: ``Unreachable`` (nothing answered, refused, DNS, reset),
  ``DeadlineExceeded``. An HTTP error status is not an exception here: ``Reply.status`` says it,
  and ``Reply.detail()`` gives the server's own message; callers decide what it means.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from launcher.errors import LaunchError
from launcher.rules.checks import BadOption

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_BODY_BYTES = 256 * 1024 * 1024  # a reply larger than this is refused, not buffered


class Unreachable(LaunchError):
    url: str
    reason: str
    message = "cannot reach {url}: {reason}. Is the server running there?"


class DeadlineExceeded(LaunchError):
    url: str
    seconds: float
    message = "{url} did not answer within {seconds:g} s."


@dataclass(frozen=True)
class Url:
    """A parsed http(s) URL: what to connect to, and how to show it without credentials."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, at least "/"
    auth: str | None  # "user:password" from the URL, sent as Basic auth

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    @property
    def shown(self) -> str:
        return self.origin + (self.path if self.path != "/" else "")

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


def parse_url(url: str, option: str = "--url") -> Url:
    """``url`` checked and split, or ``BadOption(option, <url without credentials>, ...)``."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise BadOption(option, redact(url), "the port is not a number between 0 and 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadOption(option, redact(url), "give an http(s) address such as http://127.0.0.1:23333")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise BadOption(option, redact(url).encode("unicode_escape").decode(), "it holds a control character")
    if " " in text:  # http.client refuses to send it (InvalidURL)
        raise BadOption(option, redact(url), "the host name holds a space" if " " in parts.hostname
                        else "it holds a space; write it as %20")
    if not (parts.path + parts.query).isascii():  # the request line is ASCII: http.client cannot send it
        raise BadOption(option, redact(url), "its path holds a character that is not ASCII; percent-encode it "
                        "(UTF-8, e.g. %C3%A9)")
    auth = None
    if parts.username is not None:
        auth = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(parts.password or "")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    default = 443 if parts.scheme == "https" else 80
    return Url(parts.scheme, parts.hostname, default if port is None else port, path, auth)  # ":0" is port 0


def redact(url: str) -> str:
    """``url`` without ``user:password@``; safe to print."""
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    except ValueError:
        return "<url>"
    if "@" not in parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def join(base: str, path: str) -> str:
    """``base`` (a server root, any trailing ``/``) + ``path`` (starting with ``/``)."""
    return base.rstrip("/") + path


@dataclass(frozen=True)
class Reply:
    url: str  # redacted
    status: int
    body: bytes
    seconds: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON, or ``ValueError``."""
        return json.loads(self.body)

    def detail(self) -> str:
        """The server's own error message from lmdeploy's, OpenAI's or FastAPI's error JSON."""
        text = self.body.decode("utf-8", "replace").strip()
        try:
            data = json.loads(text)
        except ValueError:
            return text[:300] or "(empty body)"
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])[:300]
            for key in ("message", "detail", "error", "text"):
                if data.get(key):
                    return str(data[key])[:300]
        return text[:300]


def _proxy_for(url: Url) -> Url | None:
    if url.is_loopback:
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme)
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    try:
        return parse_url(proxy, option=f"{url.scheme}_proxy")
    except LaunchError:
        return None


def _connection(url: Url, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    proxy = _proxy_for(url)
    if url.scheme == "https":
        context = ssl.create_default_context()
        if proxy is not None:
            conn = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=timeout, context=context)
            conn.set_tunnel(url.host, url.port)
            return conn, url.path
        return http.client.HTTPSConnection(url.host, url.port, timeout=timeout, context=context), url.path
    if proxy is not None:
        return http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout), url.origin + url.path
    return http.client.HTTPConnection(url.host, url.port, timeout=timeout), url.path


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, (ConnectionError, http.client.HTTPException)):
        return f"the connection broke ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def request(
    method: str,
    url: str,
    *,
    json_body: Any = None,
    api_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float,
) -> Reply:
    """One HTTP request, finished (body read) within ``timeout`` seconds or ``DeadlineExceeded``.

    ``api_key`` goes out as ``Authorization: Bearer``. Any status comes back as a ``Reply``;
    only transport failures raise (``Unreachable``, ``DeadlineExceeded``)."""
    target = parse_url(url)
    shown = target.shown
    out_headers = {"Accept": "application/json", "User-Agent": "launch"}
    data = None
    if json_body is not None:
        data = json.dumps(json_body).encode()
        out_headers["Content-Type"] = "application/json"
    if target.auth is not None:
        out_headers["Authorization"] = "Basic " + base64.b64encode(target.auth.encode()).decode()
    if api_key:
        out_headers["Authorization"] = f"Bearer {api_key}"
    out_headers.update(headers or {})

    start = time.monotonic()
    conn, path = _connection(target, timeout)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            conn.request(method, path, body=data, headers=out_headers)
            response = conn.getresponse()
            body = response.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES:
                raise http.client.HTTPException(f"reply larger than {MAX_BODY_BYTES} bytes")
            result["reply"] = (response.status, body)
        except BaseException as exc:  # handed to the waiting thread  # noqa: BLE001
            result["error"] = exc

    worker = threading.Thread(target=run, name=f"http {method} {shown}", daemon=True)
    worker.start()
    expired = True
    try:
        worker.join(timeout)
        expired = worker.is_alive()
    finally:
        if expired:  # past the deadline, or interrupted: cut the connection (the worker then ends)
            _abort(conn)
    if expired:
        raise DeadlineExceeded(shown, timeout)
    conn.close()
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, (TimeoutError, socket.timeout)):
            raise DeadlineExceeded(shown, timeout) from None
        raise Unreachable(target.origin, _reason(exc)) from None
    status, body = result["reply"]
    return Reply(shown, status, body, time.monotonic() - start)


def _abort(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def get(url: str, *, api_key: str | None = None, timeout: float) -> Reply:
    return request("GET", url, api_key=api_key, timeout=timeout)


def post(url: str, body: Any, *, api_key: str | None = None, timeout: float) -> Reply:
    return request("POST", url, json_body=body, api_key=api_key, timeout=timeout)


def status_of(url: str, *, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET url``, or ``None`` when nothing answers in time (a server still loading
    its weights looks like that)."""
    try:
        return get(url, timeout=timeout).status
    except (Unreachable, DeadlineExceeded):
        return None
