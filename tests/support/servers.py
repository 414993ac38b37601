"""What the tests' HTTP servers share (the probe and ppl stand-ins, the api_server stand-in, the echo
server of test_http): a quiet request handler that answers JSON, a threaded server on 127.0.0.1
that serves while a ``with`` block runs (``serving``; ``Standin``, the base of the in-process
stand-ins), and ``RawServer``, a TCP server that accepts and never answers properly.

Standard library only: ``tests/support/standin_openai.py`` imports it as a script.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing (pytest's output stays clean) and answers JSON."""

    json_headers = ("Content-Type", "Content-Length")  # the api_server stand-in writes uvicorn's lower case

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_json(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header(self.json_headers[0], "application/json")
        self.send_header(self.json_headers[1], str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (a request past its deadline) is expected here, not a failure to print."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0,
            poll_interval: float = 0.5) -> Iterator[ThreadingHTTPServer]:
    """``handler`` served on ``host:port`` (0: any free port) by a thread, until the block ends."""
    server = QuietServer((host, port), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


class Standin:
    """``with standin: standin.url``: serves ``handler()`` (a handler class whose ``state`` is the
    stand-in) on ``host:port`` (0: any free port) while the block runs."""

    host = "127.0.0.1"
    port = 0
    _server: ThreadingHTTPServer | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        assert self._server is not None
        return url_of(self._server)

    def __enter__(self):  # the subclass, typed by its own __enter__ where that matters
        standin = self

        class Handler(self.handler()):  # type: ignore[misc, valid-type]
            state = standin

        self._stack = ExitStack()
        self._server = self._stack.enter_context(serving(Handler, self.host, self.port))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class RawServer:
    """A TCP server on 127.0.0.1 that accepts, reads the request and then: ``silent`` never answers;
    ``drip`` sends a 200 header and then one byte a second of a 100-byte body."""

    def __init__(self, behaviour: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.behaviour = behaviour
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        try:
            conn.recv(65536)
            if self.behaviour == "drip":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
                for _ in range(100):
                    if self.stop.wait(1.0):
                        break
                    conn.sendall(b" ")
            else:
                self.stop.wait(60)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> RawServer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.sock.close()


class Scripted(Standin):
    """A server of the tests' own (not a stand-in for anything): it answers ``(method, path)`` with
    the ``(status, body bytes)`` the test put in ``replies`` (changeable while it runs; 404 for any
    other path) and records each request as ``(method, path, headers, body bytes)`` in ``seen``.
    For the clients' tests: a reply of any shape, hostile ones included, exactly as given."""

    def __init__(self, replies: dict[tuple[str, str], tuple[int, bytes]] | None = None) -> None:
        self.replies = dict(replies or {})
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _ScriptedHandler


class _ScriptedHandler(JSONHandler):
    state: Scripted

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.state.seen.append((self.command, self.path, dict(self.headers), body))
        status, reply = self.state.replies.get((self.command, self.path), (404, b'{"detail": "Not Found"}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _answer
