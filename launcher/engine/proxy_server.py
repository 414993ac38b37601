"""The proxy process: ``python -m launcher.engine.proxy_server /dev/stdin`` (its spec on its stdin).

Started and supervised by ``launch proxy start``. Runs lmdeploy's own proxy
(``lmdeploy.serve.proxy.proxy.proxy``, what ``lmdeploy serve proxy`` calls) in this process, with:

- the API keys read from its spec, which launch writes into a pipe to its stdin: never on the
  command line (``ps`` shows that), never in a file (nothing holds them once it stops);
- the cache-status file disabled: by default lmdeploy writes its node list into its own
  installation (``site-packages/lmdeploy/serve/proxy/proxy_config.json``) and loads it back at the
  next start. It loads that file when its module is imported, before any flag is read, so a node
  list left there by another run is dropped here too: a proxy launch starts has no nodes;
- a door on lmdeploy's open ``POST /nodes/add`` (``NodeDoor``): lmdeploy stores any string as a node,
  and one it cannot render in JSON (a lone surrogate, ``"http://\\udcff:1"``, or one in a model name)
  makes its ``/nodes/status`` answer HTTP 500 for good, and with it launch's watchdog, ``launch proxy
  status`` and ``proxy add``. A body whose text UTF-8 cannot carry, or a node URL the one node rule
  (``node_problem``) refuses, is answered 400 with one line and never reaches lmdeploy; every other
  request reaches it byte for byte;
- its log redacted (``RedactingStream``): lmdeploy logs every node it adds, removes and routes to, as
  given (``add node http://user:password@host:port successfully``); this process's stdout and stderr,
  which launch keeps as ``proxy.log``, write every URL through ``http.redact`` (no ``user:password@``).
  They are put in place before lmdeploy is imported, so lmdeploy's handler, uvicorn's (set up when it
  runs) and the traceback printer all write through them.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading

from launcher.errors import LaunchError, printable
from launcher.net import http
from launcher.runtime.paths import read_spec

NODE_ADD = "/nodes/add"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", re.ASCII)  # up to ASCII blank: \u3000 is no end of a URL
_HELD_MAX = 1 << 20  # a line longer than this is written at its last blank, not held whole


# --- the one node rule ---------------------------------------------------------------------------


def node_problem(url: str) -> str | None:
    """Why lmdeploy's proxy must not hold ``url`` as a node, or ``None``: a character that is not
    printable (a lone surrogate lmdeploy cannot render in JSON, a control character, a separator) or a
    blank around it; no ``http://`` / ``https://``; a URL ``http.parse_url`` refuses; a host that is no
    address and no name (``address.check_host``); a port outside 1..65535. The door refuses these and
    launch's watchdog takes out any such entry it finds by this rule too."""
    from launcher.runtime.address import check_host

    odd = next((ch for ch in url if not ch.isprintable()), None)
    if odd is not None:
        return f"it holds {printable(odd)}, which is not a printable character"
    if url != url.strip():
        return "it has a blank before or after it"
    if "://" not in url:
        return "it has no http:// or https://"
    try:
        parsed = http.parse_url(url)
        check_host(parsed.host, "URL", "give the server's address, e.g. http://10.0.0.5:23333")
    except LaunchError as err:
        return str(getattr(err, "reason", err))
    if not 1 <= parsed.port <= 65535:
        return "the port must be from 1 to 65535"
    return None


def add_problem(body: bytes) -> str | None:
    """Why the body of a ``POST /nodes/add`` must not reach lmdeploy, or ``None``. Read as lmdeploy's
    FastAPI reads it (``json.loads``: a key given twice counts once, the last); a body that is no JSON
    or holds no URL string is lmdeploy's to refuse (HTTP 422)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    if isinstance(url, str):
        problem = node_problem(url)
        if problem is not None:
            return f"{printable(http.redact(url))} ({problem})"
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"its JSON holds text that is not UTF-8 ({printable(err.object[err.start:err.end])}, a lone surrogate)"
    except (ValueError, RecursionError):
        return None
    return None


class NodeDoor:
    """ASGI middleware before lmdeploy's app: a ``POST /nodes/add`` that ``add_problem`` refuses is
    answered ``400 {"detail": "launch's proxy takes no such node: ..."}``; everything else is passed on
    as it came (the body it read is handed on unchanged)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") != NODE_ADD:
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        problem = add_problem(body) if messages[-1].get("type") == "http.request" else None
        if problem is not None:
            answer = json.dumps({"detail": f"launch's proxy takes no such node: {problem}"}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(answer)).encode())]})
            await send({"type": "http.response.body", "body": answer})
            return

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# --- the log ---------------------------------------------------------------------------------------


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through ``http.redact`` (its ``user:password@`` taken out)."""
    return _URL.sub(lambda match: http.redact(match.group(0)), text)


class RedactingStream(io.TextIOBase):
    """A text stream that writes ``redact_text`` of what it is given to ``stream``, line by line (a
    URL cut across two writes is still found); ``flush`` writes out a line begun."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._held = ""
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._held += text
            end = self._held.rfind("\n") + 1
            if not end and len(self._held) > _HELD_MAX:
                end = max(self._held.rfind(" "), self._held.rfind("\t")) + 1 or len(self._held)
            if end:
                done, self._held = self._held[:end], self._held[end:]
                self._stream.write(redact_text(done))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._held:
                done, self._held = self._held, ""
                self._stream.write(redact_text(done))
            self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:
        return self._stream.encoding

    @property
    def errors(self) -> str | None:
        return self._stream.errors


def redact_output() -> None:
    """This process's stdout and stderr (launch's ``proxy.log``) write no URL's ``user:password@``."""
    sys.stdout = RedactingStream(sys.stdout)
    sys.stderr = RedactingStream(sys.stderr)


def proxy_kwargs(data: dict) -> dict:
    """Keyword arguments of ``lmdeploy.serve.proxy.proxy.proxy`` for a spec. ``api_keys`` is a
    list or None: lmdeploy iterates a string character by character."""
    keys = [str(k) for k in data.get("api_keys") or []]
    return {
        "server_name": data["server_name"],
        "server_port": int(data["server_port"]),
        "routing_strategy": data["routing_strategy"],
        "api_keys": keys or None,
        "disable_cache_status": True,
        "log_level": "INFO",
    }


def main(argv: list[str] | None = None) -> int:
    data = read_spec(argv, "launcher.engine.proxy_server")
    if data is None:
        return 2
    kwargs = proxy_kwargs(data)
    redact_output()  # before lmdeploy makes its log handler on sys.stdout
    from lmdeploy.serve.proxy.proxy import app, node_manager, proxy

    app.add_middleware(NodeDoor)  # inside the API-key check lmdeploy adds when it runs

    dropped = sorted(node_manager.nodes)
    node_manager.nodes.clear()
    node_manager.cache_status = False
    print(
        f"launch proxy_server: lmdeploy proxy on {kwargs['server_name']}:{kwargs['server_port']}, routing "
        f"{kwargs['routing_strategy']}, API keys {'on' if kwargs['api_keys'] else 'off'}, cache-status file off, "
        "node URLs checked at /nodes/add, URLs in this log without user:password"
        + (f"; dropped {len(dropped)} node(s) lmdeploy loaded from its cache file" if dropped else ""),
        file=sys.stderr,
        flush=True,
    )
    proxy(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
