"""Run the OpenAI api_server as a supervised child process: check the port, start it, wait until it
is healthy, tell the user where it is, and stop it cleanly on every path, leaving no process behind.

Why a child process: lmdeploy's ``serve()`` blocks, builds the engine before it binds the port (the
port stays closed for the minutes the weights take to load), and may start helper processes of its
own. Running it in its own process group (``launcher.runtime.process``) lets ``launch`` watch it, show
progress (``launcher.runtime.progress``), time out, and stop the whole group with one signal. The pieces:
``launcher.runtime.address`` (host and port rules), ``launcher.net.health`` (is it up?), ``launcher.runtime.ready``
(what the user is told). Call ``run_supervised`` from the main thread (signals, PDEATHSIG).

Only the standard library is imported here, so the supervisor starts fast and runs in any test.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from launcher.errors import LaunchError
from launcher.net.health import POLL_S, health_status, served_models
from launcher.net.http import parse_url
from launcher.runtime.address import check_port_free, server_root_url, validate_host
from launcher.runtime.process import DEFAULT_GRACE_S, ServerProcess, _with_tail, describe_exit
from launcher.runtime.progress import PROGRESS_EVERY_S, StartProgress
from launcher.runtime.ready import ReadyInfo


class ServerStartFailed(LaunchError):
    """The server process ended before ``/health`` answered 200."""

    returncode: int
    log_path: str
    tail: tuple[str, ...] = ()

    def message(self) -> str:
        return _with_tail(f"the server {describe_exit(self.returncode)} while starting; full log: "
                          f"{self.log_path}.", self.tail)


class ServerStartTimeout(LaunchError):
    timeout_s: float
    log_path: str
    tail: tuple[str, ...] = ()
    flag: str = "--health-timeout"  # the flag that sets timeout_s

    def message(self) -> str:
        return _with_tail(f"the server did not become ready within {self.timeout_s:g} s, so launch stopped "
                          f"it. If it needs longer to start, raise {self.flag}; full log: "
                          f"{self.log_path}.", self.tail)


class ServerDied(LaunchError):
    """The server process ended on its own after it was ready."""

    returncode: int
    log_path: str
    tail: tuple[str, ...] = ()

    def message(self) -> str:
        return _with_tail(f"the server {describe_exit(self.returncode)} after it was ready; full log: "
                          f"{self.log_path}.", self.tail)


DEFAULT_HEALTH_TIMEOUT_S = 1800.0  # loading a large checkpoint from a slow disk takes minutes

_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


@dataclass(frozen=True)
class SeamsForTests:
    """TEST SEAM of ``run_supervised``: nothing a user sets. The defaults are the product's; tests
    shorten the stop grace period, capture the progress output, and stop the server once the probe
    has run instead of serving until a signal."""

    grace_s: float = DEFAULT_GRACE_S
    progress_stream: TextIO | None = None  # None: sys.stderr
    progress_every_s: float = PROGRESS_EVERY_S
    stop_after_probe: bool = False


PRODUCT = SeamsForTests()


class StopSignals:
    """Turns SIGINT / SIGTERM / SIGHUP into a flag the loops poll (no exception mid-cleanup). While
    ``interrupting`` (a probe runs) the first signal raises KeyboardInterrupt instead, so a long
    probe can be cut short. Signals ignored on entry (``nohup``) stay ignored. Only the main thread
    can install handlers; elsewhere this does nothing and the caller's own handling applies."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()  # set by the first signal: for loops that wait on it
        self.interrupting = False
        self._saved: dict[int, object] = {}

    def __enter__(self) -> StopSignals:  # noqa: PYI034 - Python 3.10 has no typing.Self
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
        self.event.set()
        if self.interrupting and self.count == 1:
            raise KeyboardInterrupt

    def requested(self) -> bool:
        return self.count > 0

    def hurried(self) -> bool:
        return self.count > 1


def _sleep_unless(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + max(0.0, seconds)
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def wait_ready(
    server: ServerProcess,
    health_url: str,
    *,
    timeout_s: float,
    grace_s: float,
    progress: StartProgress,
    stop_requested: Callable[[], bool],
) -> bool:
    """Wait for ``GET health_url`` = 200 while ``server`` runs, answered by ``server`` itself (a
    process of its group holds the listening socket: another program that took the port first does
    not make it ready). ``True`` when healthy, ``False`` when ``stop_requested()`` turned true first
    (the caller stops the server).

    Raises ``ServerStartFailed`` (the process ended; its group is swept) or ``ServerStartTimeout``
    (after stopping the server), each with the log's last lines."""
    started = time.monotonic()
    port = parse_url(health_url).port
    while True:
        if stop_requested():
            return False
        code = server.poll()
        if code is not None:
            server.sweep_group()
            raise ServerStartFailed(code, str(server.log_path), tuple(server.log_tail()))
        if (health_status(health_url, timeout=1.0) == 200 and server.poll() is None
                and server.listens_on(port) is not False):
            progress.done(time.monotonic() - started)
            return True
        elapsed = time.monotonic() - started
        if elapsed >= timeout_s:
            tail = tuple(server.log_tail())
            progress.clear()
            server.stop(grace_s, hurry=stop_requested)
            raise ServerStartTimeout(timeout_s, str(server.log_path), tail)
        progress.update(elapsed, (server.log_tail(1) or [""])[0])
        _sleep_unless(min(POLL_S, timeout_s - elapsed), stop_requested)


def run_supervised(
    argv: Sequence[str],
    *,
    host: str,
    port: int | str,
    log_path: Path | str,
    api_keys: Sequence[str] | None = None,
    model_name: str | None = None,
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
    on_ready: Callable[[ReadyInfo], None] | None = None,
    probe: Callable[[ReadyInfo], Callable[[], None] | None] | None = None,
    on_stop: Callable[[], None] | None = None,
    stdin_data: bytes | None = None,
    seams: SeamsForTests = PRODUCT,
) -> int:
    """Serve until stopped: check the port, start ``argv``, wait for health, report, supervise.

    ``argv`` must make a server listen on ``host:port`` (the caller passes the same values to it, and
    the same ``api_keys``; here they only serve the port check, the health URL, the model lookup and
    the printed curl example). Progress goes to stderr.

    Once ``/health`` answers 200: ``on_ready(info)`` (the caller prints ``info.summary_lines()``),
    then ``probe(info)`` if given (the first Ctrl-C / SIGTERM interrupts it with KeyboardInterrupt,
    and the server then stops as for any signal; an exception stops the server and propagates); a
    callable it returns runs next, uninterrupted (for writing its results). Then it serves until
    SIGINT / SIGTERM / SIGHUP, which stop it (SIGTERM to its group, a grace period, SIGKILL; a second
    signal skips the wait) and return 0. A signal while it is still starting also stops it and
    returns 0.

    Raises ``BadOption`` / ``PortBusy`` before starting anything; ``ServerNotStarted``,
    ``ServerLogNotWritable``; ``ServerStartFailed`` / ``ServerStartTimeout`` while starting;
    ``ServerDied`` if it exits on its own after it was ready. No path leaves the server running.

    ``on_stop()`` runs once on every path out once ``on_ready`` was called (a signal, the server
    dying, a probe failing, ``on_ready`` itself failing), before the server is stopped: a replica
    leaves its proxy there. It must not raise (what it raises is dropped: the stop goes on).

    ``stdin_data``: what the server reads on its stdin (its spec, API keys included: handed over
    through a pipe, never written to disk).
    """
    if isinstance(api_keys, (str, bytes)):
        raise TypeError("api_keys must be a list of keys, not one string")
    port = check_port_free(host, port)
    host = validate_host(host)
    root = server_root_url(host, port)
    grace_s = seams.grace_s
    server = ServerProcess(argv, log_path=log_path, stdin_data=stdin_data)
    leaving: list[Callable[[], None]] = []  # on_stop, once on_ready has returned

    def stop_server(hurry: Callable[[], bool] | None = None) -> None:
        while leaving:
            try:
                leaving.pop()()
            except Exception:  # noqa: BLE001, S110 - the stop must go on whatever on_stop does
                pass
        server.stop(grace_s, hurry=hurry)

    with StopSignals() as signals:
        try:
            progress = StartProgress(seams.progress_stream or sys.stderr, log_path=server.log_path,
                                     every_s=seams.progress_every_s)
            started = time.monotonic()
            server.start()
            ready = wait_ready(server, root + "/health", timeout_s=health_timeout_s, grace_s=grace_s,
                               progress=progress, stop_requested=signals.requested)
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
            if on_stop:
                leaving.append(on_stop)
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
                if seams.stop_after_probe:
                    stop_server(signals.hurried)
                    return 0
            while not signals.requested():
                code = server.poll()
                if code is not None:
                    stop_server()  # reaps and sweeps what it left in its group
                    raise ServerDied(code, str(server.log_path), tuple(server.log_tail()))
                time.sleep(0.1)
            stop_server(signals.hurried)
            return 0
        finally:
            stop_server(signals.hurried)
