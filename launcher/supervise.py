"""Run the OpenAI api_server as a supervised child process: start it, wait until it is healthy, tell
the user where it is, and stop it cleanly, leaving no process behind.

Why a child process: lmdeploy's ``serve()`` blocks, builds the engine before it binds the port (the
port stays closed for the minutes the weights take to load), and may start helper processes of its
own. Running it in its own process group lets ``launch`` watch it, show progress, time out, and
stop the whole group with one signal.

The stop rule, used on every path (Ctrl-C, SIGTERM, SIGHUP, start-up timeout, errors, a probe
that fails): SIGTERM to the group, wait ``grace_s``, then SIGKILL to the group; afterwards anything
left in the group is swept the same way. On Linux the child also gets SIGTERM if ``launch`` itself
is killed outright (``PR_SET_PDEATHSIG``), so even ``kill -9`` of launch leaves no server running.
That signal is tied to the thread that started the child: call ``run_supervised`` from the main
thread.

Only the standard library is imported here, so the supervisor starts fast and runs in any test.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .engine import DEFAULT_HEALTH_TIMEOUT_S
from .errors import (
    BadOption,
    PortBusy,
    ServerDied,
    ServerLogNotWritable,
    ServerNotStarted,
    ServerStartFailed,
    ServerStartTimeout,
)

DEFAULT_GRACE_S = 15.0
TAIL_LINES = 20
POLL_S = 0.25
PROGRESS_EVERY_S = 10.0
CURL_KEY_PLACEHOLDER = "$LAUNCH_API_KEY"

# Our own server is local: never send these requests through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


# --- host and port -----------------------------------------------------------------------------


def validate_port(port: int | str) -> int:
    """``port`` as an int in 1..65535, or ``BadOption('--port', ...)``. Port 0 ("any free port") is
    refused because the printed URL would be wrong."""
    text = str(port).strip()
    if isinstance(port, bool) or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadOption("--port", str(port), "must be a whole number from 1 to 65535, e.g. --port 23333")
    return int(text)


def validate_host(host: str) -> str:
    """``host`` without IPv6 brackets; empty or blank is refused (say 0.0.0.0 for all interfaces)."""
    text = (host or "").strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or any(ch.isspace() for ch in text) or "/" in text:
        raise BadOption("--host", str(host), "is not an address; use 127.0.0.1 (this machine only) "
                        "or 0.0.0.0 (all interfaces)")
    return text


def check_port_free(host: str, port: int | str) -> int:
    """Refuse a port the server could not bind, before any weight is loaded; return the port.

    Binds the way uvicorn's ``loop.create_server(host=..., port=...)`` does (every address the host
    resolves to, ``SO_REUSEADDR``, IPv6 sockets v6-only), then lets go. A port that merely has old
    connections in TIME_WAIT is free by that rule, as it is for uvicorn. Another process can still
    take the port while the weights load; then the server exits while starting and its log says so.
    """
    port = validate_port(port)
    host = validate_host(host)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadOption("--host", host, f"cannot be resolved ({exc.strerror}); use an address such as "
                        "127.0.0.1") from None
    held: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, type_, proto)
            except OSError:
                continue  # an address family this machine lacks; uvicorn skips it too
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise _bind_error(host, port, exc) from None
    finally:
        for sock in held:
            sock.close()
    return port


def _bind_error(host: str, port: int, exc: OSError) -> Exception:
    if exc.errno == errno.EADDRINUSE:
        status = health_status(f"http://{_url_host(client_host(host))}:{port}/health", timeout=1.0)
        who = ("a server that answers /health listens there; is another `launch serve` running?"
               if status is not None else "another program listens there")
        return PortBusy(host, port, who)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return BadOption("--port", str(port), "needs root to listen on (ports below 1024 are privileged); "
                         "pick a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return BadOption("--host", host, "is not an address of this machine; use 127.0.0.1 (this machine "
                         "only) or 0.0.0.0 (all interfaces)")
    return BadOption("--port", str(port), f"cannot listen on {host}:{port} ({exc.strerror or exc})")


def client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server listening on ``host``."""
    return _WILDCARD_HOSTS.get(host.strip("[]"), host.strip("[]"))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_root_url(host: str, port: int) -> str:
    """``http://127.0.0.1:23333``: where the server answers, as seen from this machine."""
    return f"http://{_url_host(client_host(host))}:{port}"


def openai_base_url(host: str, port: int) -> str:
    """The OpenAI base URL clients are given: ``http://HOST:PORT/v1``."""
    return server_root_url(host, port) + "/v1"


# --- health ------------------------------------------------------------------------------------


def health_url_for(url: str) -> str:
    """``/health`` of the server at ``url``: its root, its ``/v1`` base URL, or the health URL."""
    url = url.rstrip("/")
    if url.endswith("/health"):
        return url
    return url.removesuffix("/v1") + "/health"


def health_status(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET url`` (a health URL), or ``None`` when nothing answers (port closed,
    connection reset, timeout): that is how a server still loading its weights looks."""
    try:
        with _OPENER.open(urllib.request.Request(url, method="GET"), timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, ValueError):  # URLError, ConnectionError and socket timeouts are OSErrors
        return None


def wait_healthy(url: str, timeout: float, *, interval: float = POLL_S) -> bool:
    """Poll ``/health`` of the server at ``url`` (root, ``/v1`` base or health URL) until it answers
    200; ``True`` then, ``False`` once ``timeout`` seconds have passed. For the smoke test and probes;
    the supervisor also watches the process while it waits."""
    health = health_url_for(url)
    deadline = time.monotonic() + timeout
    while True:
        if health_status(health, timeout=max(0.1, min(2.0, deadline - time.monotonic()))) == 200:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def _get_json(url: str, headers: Mapping[str, str], timeout: float = 5.0) -> object | None:
    try:
        with _OPENER.open(urllib.request.Request(url, headers=dict(headers)), timeout=timeout) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def served_models(root_url: str, api_key: str | None = None) -> list[str]:
    """Model ids from ``GET /v1/models`` (empty if it does not answer as expected)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = _get_json(root_url.rstrip("/") + "/v1/models", headers)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return []
    return [str(card["id"]) for card in payload["data"] if isinstance(card, dict) and "id" in card]


# --- the log -----------------------------------------------------------------------------------


def read_log_tail(
    path: Path, n: int = TAIL_LINES, *, start: int = 0, max_bytes: int = 64 * 1024
) -> list[str]:
    """The last ``n`` non-blank lines written to ``path`` after byte ``start``, readable: colour codes
    removed, progress bars (``\\r`` rewrites) reduced to their last state, long lines cut."""
    try:
        with open(path, "rb") as log:
            end = log.seek(0, os.SEEK_END)
            log.seek(max(start, end - max_bytes))
            data = log.read()
    except OSError:
        return []
    lines = []
    for raw in data.decode("utf-8", errors="replace").split("\n"):
        line = _ANSI.sub("", raw.rstrip("\r").split("\r")[-1]).rstrip()
        if line.strip():
            lines.append(line if len(line) <= 300 else line[:299] + "…")
    return lines[-n:] if n > 0 else []


# --- the process -------------------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux send SIGTERM to the child when its parent dies, so a
    ``kill -9`` of launch cannot orphan a server holding the GPU. ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigterm, pr_set_pdeathsig = os.getpid(), int(signal.SIGTERM), 1

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sigterm)

    return preexec


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class ServerProcess:
    """One server command run in its own process group, its stdout and stderr appended to a log.

    ``env`` is the child's whole environment (``None``: inherit this one); ``PYTHONUNBUFFERED=1`` is
    added unless set, so the log (and the progress line) shows output as it happens. Usable as a
    context manager: leaving the block stops the server.
    """

    def __init__(self, argv: Sequence[str], *, log_path: Path | str, env: Mapping[str, str] | None = None,
                 cwd: Path | str | None = None) -> None:
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not one string")
        self.argv = [os.fspath(arg) for arg in argv]
        if not self.argv:
            raise ValueError("argv is empty")
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self._proc: subprocess.Popen | None = None
        self._log_start = 0

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> ServerProcess:
        if self._proc is not None:
            raise RuntimeError("this ServerProcess was already started")
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the `with log` below
        except OSError as exc:
            raise ServerLogNotWritable(str(self.log_path), exc.strerror or str(exc)) from None
        with log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== launch {stamp}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    cwd=self.cwd, start_new_session=True,
                    preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - one prctl call, nothing else
                )
            except OSError as exc:
                raise ServerNotStarted(self.argv[0], exc.strerror or str(exc)) from None
        return self

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server was not started")
        return self._proc.pid

    def poll(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal), else None."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, n: int = TAIL_LINES) -> list[str]:
        """The last ``n`` lines this run wrote to the log."""
        return read_log_tail(self.log_path, n, start=self._log_start)

    # -- wait -----------------------------------------------------------------------------------
    def wait_ready(
        self,
        health_url: str,
        *,
        timeout_s: float,
        timeout_flag: str = "--health-timeout",
        grace_s: float = DEFAULT_GRACE_S,
        progress: StartProgress | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Wait for ``GET health_url`` = 200 while the process runs. ``True`` when healthy, ``False``
        when ``stop_requested()`` turned true first (the caller stops the server).

        Raises ``ServerStartFailed`` (the process ended; its group is swept) or ``ServerStartTimeout``
        (after stopping the server), each with the log's last lines."""
        started = time.monotonic()
        while True:
            if stop_requested():
                return False
            code = self.poll()
            if code is not None:
                self._sweep_group()
                raise ServerStartFailed(code, str(self.log_path), tuple(self.log_tail()))
            if health_status(health_url, timeout=1.0) == 200 and self.poll() is None:
                if progress:
                    progress.done(time.monotonic() - started)
                return True
            elapsed = time.monotonic() - started
            if elapsed >= timeout_s:
                tail = tuple(self.log_tail())
                if progress:
                    progress.clear()
                self.stop(grace_s, hurry=stop_requested)
                raise ServerStartTimeout(timeout_s, timeout_flag, str(self.log_path), tail)
            if progress:
                progress.update(elapsed, (self.log_tail(1) or [""])[0])
            _sleep_unless(min(POLL_S, timeout_s - elapsed), stop_requested)

    # -- stop -----------------------------------------------------------------------------------
    def stop(
        self, grace_s: float = DEFAULT_GRACE_S, *, hurry: Callable[[], bool] | None = None
    ) -> int | None:
        """Stop the server and everything in its process group: SIGTERM, up to ``grace_s`` seconds,
        then SIGKILL. ``hurry()`` turning true (a second Ctrl-C) skips the rest of the grace period.
        Idempotent; returns the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline and not (hurry and hurry()):
                time.sleep(0.05)
            if proc.poll() is None:
                self._signal_group(signal.SIGKILL)
        proc.wait()
        self._sweep_group()
        return proc.returncode

    def _signal_group(self, signum: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signum)  # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass

    def _sweep_group(self, wait_s: float = 2.0) -> None:
        """After the leader has ended, end whatever it left in its group (worker processes)."""
        assert self._proc is not None
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if not _group_members(self._proc.pid):
                return
            self._signal_group(signum)
            deadline = time.monotonic() + wait_s
            while _group_members(self._proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def _sleep_unless(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + max(0.0, seconds)
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


# --- progress ----------------------------------------------------------------------------------


class StartProgress:
    """What the user sees while the weights load (this module's only output, on ``stream``).

    On a terminal: one line rewritten in place, elapsed seconds and the server's last log line. Else
    (a log file, CI): one line every ``every_s`` seconds, so logs stay readable."""

    def __init__(self, stream: TextIO, *, log_path: Path, every_s: float = PROGRESS_EVERY_S) -> None:
        self.stream = stream
        self.every_s = every_s
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._last_text = ""
        self._next_line_at = every_s
        self._write(f"launch: starting the server; its log: {log_path}\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not stop the server

    def update(self, elapsed: float, last_line: str) -> None:
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            text = f"launch: loading… {elapsed:4.0f} s | {last_line}"[:width]
            if text != self._last_text:
                self._write("\r\x1b[K" + text)
                self._last_text = text
        elif elapsed >= self._next_line_at:
            self._write(f"launch: still starting after {elapsed:.0f} s: {last_line}\n")
            self._next_line_at = elapsed + self.every_s

    def clear(self) -> None:
        if self.tty and self._last_text:
            self._write("\r\x1b[K")
            self._last_text = ""

    def done(self, elapsed: float) -> None:
        self.clear()
        self._write(f"launch: the server is healthy after {elapsed:.0f} s\n")


# --- readiness report --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadyInfo:
    """Where the ready server is. ``api_key`` (the first key, for a probe's own requests) is kept out
    of ``repr`` and of everything printable; the curl example uses ``$LAUNCH_API_KEY`` instead."""

    host: str  # as given (may be 0.0.0.0)
    port: int
    root_url: str  # http://127.0.0.1:23333 (reachable from this machine)
    base_url: str  # root_url + "/v1": the OpenAI base URL
    model_name: str
    served_models: tuple[str, ...]
    pid: int
    log_path: Path
    startup_s: float
    auth: bool = False
    api_key: str | None = field(default=None, repr=False)

    @property
    def health_url(self) -> str:
        return self.root_url + "/health"

    @property
    def metrics_url(self) -> str:
        return self.root_url + "/metrics"

    def headers(self) -> dict[str, str]:
        """Headers a request to the server needs (``Authorization`` when keys are set)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def curl_example(self) -> str:
        """A chat request to paste into a shell (keys: the placeholder ``$LAUNCH_API_KEY``)."""
        body = {"model": self.model_name, "messages": [{"role": "user", "content": "Hello!"}]}
        parts = [f"curl {self.base_url}/chat/completions", "-H 'Content-Type: application/json'"]
        if self.auth:
            parts.append(f'-H "Authorization: Bearer {CURL_KEY_PLACEHOLDER}"')
        parts.append(f"-d {shlex.quote(json.dumps(body))}")
        return " \\\n  ".join(parts)

    def summary_lines(self) -> list[str]:
        """The lines to print once the server is ready (no secret in them)."""
        lines = [
            f"Serving {self.model_name}: OpenAI API at {self.base_url}  (Ctrl-C stops it)",
            f"  health {self.health_url}   metrics {self.metrics_url}",
            f"  log    {self.log_path}",
        ]
        if self.host.strip("[]") in _WILDCARD_HOSTS:
            lines.append(f"  listening on all interfaces ({self.host}): other machines use this "
                         f"machine's address, port {self.port}")
        if self.auth:
            lines.append("  API keys are required: export LAUNCH_API_KEY=<one of your keys>, then")
        lines.append("Try it:")
        lines += ["  " + line for line in self.curl_example().splitlines()]
        return lines


# --- signals -----------------------------------------------------------------------------------


class _StopSignals:
    """Turns SIGINT / SIGTERM / SIGHUP into a flag the loops poll (no exception mid-cleanup). While
    ``interrupting`` (a probe runs) the first signal raises KeyboardInterrupt instead, so a long
    probe can be cut short. Signals ignored on entry (``nohup``) stay ignored. Only the main thread
    can install handlers; elsewhere this does nothing and the caller's own handling applies."""

    def __init__(self) -> None:
        self.count = 0
        self.interrupting = False
        self._saved: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:  # noqa: PYI034 - Python 3.10 has no typing.Self
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if previous == signal.SIG_IGN:
                    continue
                self._saved[signum] = previous
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._saved.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._saved.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.interrupting and self.count == 1:
            raise KeyboardInterrupt

    def requested(self) -> bool:
        return self.count > 0

    def hurried(self) -> bool:
        return self.count > 1


# --- the whole run -----------------------------------------------------------------------------


def run_supervised(
    argv: Sequence[str],
    *,
    host: str,
    port: int,
    log_path: Path | str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    model_name: str | None = None,
    api_keys: Sequence[str] | None = None,
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
    timeout_flag: str = "--health-timeout",
    grace_s: float = DEFAULT_GRACE_S,
    on_ready: Callable[[ReadyInfo], None] | None = None,
    probe: Callable[[ReadyInfo], Callable[[], None] | None] | None = None,
    stop_after_probe: bool = False,
    progress_stream: TextIO | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
    check_port: bool = True,
) -> int:
    """Serve until stopped: check the port, start ``argv``, wait for health, report, supervise.

    ``argv`` must make a server listen on ``host:port`` (the caller passes the same values to it, and
    the same ``api_keys``; here they only serve the port check, the health URL, the model lookup and
    the printed curl example). Progress goes to ``progress_stream`` (default ``sys.stderr``).

    Once ``/health`` answers 200: ``on_ready(info)`` (the caller prints ``info.summary_lines()``),
    then ``probe(info)`` if given (the first Ctrl-C / SIGTERM interrupts it with KeyboardInterrupt,
    and the server then stops as for any signal; an exception stops the server and propagates); a
    callable it returns runs next, uninterrupted (for writing its results). With ``stop_after_probe`` the server is then
    stopped and 0 returned; otherwise it serves until SIGINT / SIGTERM / SIGHUP, which stop it
    (SIGTERM to its group, ``grace_s``, SIGKILL; a second signal skips the wait) and return 0. A
    signal while it is still starting also stops it and returns 0.

    Raises ``BadOption`` / ``PortBusy`` before starting anything; ``ServerNotStarted``,
    ``ServerLogNotWritable``; ``ServerStartFailed`` / ``ServerStartTimeout`` while starting;
    ``ServerDied`` if it exits on its own after it was ready. No path leaves the server running.
    """
    if isinstance(api_keys, (str, bytes)):
        raise TypeError("api_keys must be a list of keys, not one string")
    port = check_port_free(host, port) if check_port else validate_port(port)
    host = validate_host(host)
    root = server_root_url(host, port)
    server = ServerProcess(argv, log_path=log_path, env=env, cwd=cwd)
    with _StopSignals() as signals:
        try:
            progress = StartProgress(progress_stream or sys.stderr, log_path=server.log_path,
                                     every_s=progress_every_s)
            started = time.monotonic()
            server.start()
            ready = server.wait_ready(root + "/health", timeout_s=health_timeout_s, timeout_flag=timeout_flag,
                                      grace_s=grace_s, progress=progress, stop_requested=signals.requested)
            if not ready:
                progress.clear()
                server.stop(grace_s, hurry=signals.hurried)
                return 0
            key = api_keys[0] if api_keys else None
            models = tuple(served_models(root, key))
            info = ReadyInfo(host=host, port=port, root_url=root, base_url=root + "/v1",
                             model_name=models[0] if models else (model_name or "MODEL"),
                             served_models=models, pid=server.pid, log_path=server.log_path,
                             startup_s=time.monotonic() - started, auth=bool(api_keys), api_key=key)
            if on_ready:
                on_ready(info)
            if probe and not signals.requested():
                # The probe may be cut short by the first Ctrl-C / SIGTERM (it keeps its partial
                # results); what it returns (reporting, writing files) runs after that, whole.
                signals.interrupting = True
                try:
                    finish = probe(info)
                except KeyboardInterrupt:
                    finish = None
                finally:
                    signals.interrupting = False
                if callable(finish):
                    finish()
                if stop_after_probe:
                    server.stop(grace_s, hurry=signals.hurried)
                    return 0
            while not signals.requested():
                code = server.poll()
                if code is not None:
                    server.stop(grace_s)  # reaps and sweeps what it left in its group
                    raise ServerDied(code, str(server.log_path), tuple(server.log_tail()))
                time.sleep(0.1)
            server.stop(grace_s, hurry=signals.hurried)
            return 0
        finally:
            server.stop(grace_s, hurry=signals.hurried)
