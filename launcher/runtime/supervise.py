"""The one supervisor of launch's servers: ``serve`` (one api_server), ``serve --replicas`` (lmdeploy's
proxy and N api_servers) and ``proxy start`` (the proxy) all run their processes through ``Supervisor``.

Why child processes: lmdeploy's ``serve()`` blocks, builds the engine before it binds the port (the
port stays closed for the minutes the weights take to load), and may start helper processes of its
own. Running each server in its own process group (``launcher.runtime.process``) lets launch watch
it, show progress (``launcher.runtime.progress``), time out, and stop it with nothing left behind.

The supervisor starts every server, waits until each is ready (in order: its URL answers 200 from
its own socket), then watches them all; the first one to end, or SIGINT / SIGTERM / SIGHUP, stops
them all with the one stop policy (``process.stop_all``: one grace period for all, SIGTERM then
SIGKILL, what they left swept). The signal handler only sets a flag that the loops read. Use it from
the main thread (signals, the parent-death signal). ``run_supervised`` is ``serve``'s use of it.

Only the standard library is imported here (psutil only where ``process`` inspects processes).
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
from launcher.net.http import parse_url
from launcher.net.lmdeploy import POLL_S, health_status, served_models
from launcher.runtime.address import port_free, server_root_url
from launcher.runtime.process import GRACE_S, ServerProcess, _with_tail, describe_exit, stop_all
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
TREE_EVERY_S = 1.0  # how often the servers' process trees are noted (a few ms each)

_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


@dataclass(frozen=True)
class SeamsForTests:
    """TEST SEAM of ``run_supervised``: nothing a user sets. The defaults are the product's; tests
    shorten the stop grace period, capture the progress output, and stop the server once the probe
    has run instead of serving until a signal."""

    grace_s: float = GRACE_S
    progress_stream: TextIO | None = None  # None: sys.stderr
    progress_every_s: float = PROGRESS_EVERY_S
    stop_after_probe: bool = False


PRODUCT = SeamsForTests()


class StopSignals:
    """Turns SIGINT / SIGTERM / SIGHUP into a flag the loops poll (no exception mid-cleanup). Only
    inside ``Supervisor.interruptible`` (a probe runs, and catches it) does the first signal also
    raise KeyboardInterrupt, so a long probe can be cut short. Signals ignored on entry (``nohup``)
    stay ignored. Only the main thread can install handlers; elsewhere this does nothing and the
    caller's own handling applies."""

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


@dataclass(frozen=True)
class Supervised:
    """One server under a ``Supervisor``: its process; the URL that answers 200 once it is ready
    (``/health``; the proxy's ``/nodes/status``), which must come from the server's own socket;
    how long it may take, counted from the start, and the flag that sets that time (for the
    message); and ``when_ready()``, run once it is ready (register it with a proxy; it may raise,
    which stops everything)."""

    process: ServerProcess
    ready_url: str
    timeout_s: float
    timeout_flag: str = "--health-timeout"
    when_ready: Callable[[], None] | None = None


class Supervisor:
    """N servers started, waited for and watched together, and stopped together on every path.

    ``with Supervisor(members) as run:`` installs the stop signals; ``run.start()`` starts every
    process (from the main thread); ``run.wait_ready()`` is ``False`` when a stop signal came first;
    ``run.watch()`` returns 0 on a stop signal and raises ``ServerDied`` for the first server that
    ends on its own. Leaving the block runs the ``on_stop`` callables (last added first; what they
    raise is dropped), then stops every process (``process.stop_all``: a second signal skips the
    grace period)."""

    def __init__(self, members: Sequence[Supervised], *, grace_s: float = GRACE_S, progress_stream: TextIO | None = None,
                 progress_every_s: float = PROGRESS_EVERY_S) -> None:
        if not members:
            raise ValueError("a supervisor needs at least one server")
        self.members = list(members)
        self.grace_s = grace_s
        self.progress_stream = progress_stream
        self.progress_every_s = progress_every_s
        self.signals = StopSignals()
        self.started_at: float | None = None
        self._ready: set[int] = set()  # indexes of the members that were ready
        self._tree_noted_at = float("-inf")
        self._leaving: list[Callable[[], None]] = []

    def __enter__(self) -> Supervisor:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self.signals.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.signals.__exit__(*exc_info)

    @property
    def processes(self) -> list[ServerProcess]:
        return [member.process for member in self.members]

    def requested(self) -> bool:
        """Whether a stop signal came."""
        return self.signals.requested()

    def on_stop(self, leave: Callable[[], None]) -> None:
        """Run ``leave()`` on every path out, before the processes are stopped (it must not raise)."""
        self._leaving.append(leave)

    def start(self) -> None:
        """Start every process, in order (the main thread: their parent-death signal is tied to it)."""
        self.started_at = time.monotonic()
        for process in self.processes:
            process.start()

    def wait_ready(self) -> bool:
        """Wait for each server in order, with its own progress lines, while watching them all.
        ``True`` once all are ready; ``False`` when a stop signal came first. Raises
        ``ServerStartFailed`` (a server ended; what it left is swept), ``ServerStartTimeout`` (a
        server past its time) or ``ServerDied`` (one that was ready ended), each with its log's last
        lines; the block's end stops the rest."""
        assert self.started_at is not None, "start() first"
        for index, member in enumerate(self.members):
            server, port = member.process, parse_url(member.ready_url).port
            progress = StartProgress(self.progress_stream or sys.stderr, log_path=server.log_path,
                                     every_s=self.progress_every_s)
            began = time.monotonic()
            try:
                while not self.requested():
                    if self._answers(member, port):
                        break
                    left = self.started_at + member.timeout_s - time.monotonic()
                    if left <= 0:
                        raise ServerStartTimeout(member.timeout_s, str(server.log_path),
                                                 tuple(server.log_tail()), member.timeout_flag)
                    progress.update(time.monotonic() - began, (server.log_tail(1) or [""])[0])
                    _sleep_unless(min(POLL_S, left), self.requested)
                else:
                    return False
                progress.done(time.monotonic() - began)
            finally:
                progress.clear()
            self._ready.add(index)
            server.note_tree()  # its workers are up by now
            if member.when_ready:
                member.when_ready()
        return True

    def _answers(self, member: Supervised, port: int) -> bool:
        """Whether ``member`` is ready: its URL answers 200 while it runs, from a socket of its own
        (another program that took the port first does not make it ready). Raises as
        ``_check_running`` for any server that has ended."""
        self._check_running()
        server = member.process
        return (health_status(member.ready_url, timeout=1.0) == 200 and server.poll() is None
                and server.listens_on(port) is not False)

    def _check_running(self) -> None:
        """Raise for the first server that has ended: ``ServerDied`` once it was ready, else
        ``ServerStartFailed`` (what it left is swept at once). Every ``TREE_EVERY_S`` each
        server's process tree is noted, so that a worker that left its group is still stopped."""
        if time.monotonic() >= self._tree_noted_at + TREE_EVERY_S:
            for server in self.processes:
                server.note_tree()
            self._tree_noted_at = time.monotonic()
        for index, server in enumerate(self.processes):
            code = server.poll()
            if code is None:
                continue
            if index in self._ready:
                raise ServerDied(code, str(server.log_path), tuple(server.log_tail()))
            server.sweep()
            raise ServerStartFailed(code, str(server.log_path), tuple(server.log_tail()))

    def interruptible(self, call: Callable[[], object]) -> object:
        """``call()``, which the first stop signal interrupts with KeyboardInterrupt (it keeps what it
        has, the signal still stops the servers after); ``None`` when that escaped it."""
        self.signals.interrupting = True
        try:
            return call()
        except KeyboardInterrupt:
            return None
        finally:
            self.signals.interrupting = False

    def watch(self) -> int:
        """Until a stop signal (0) or the first server that ends on its own (``ServerDied``)."""
        while not self.signals.event.wait(0.1):
            self._check_running()
        return 0

    def stop(self) -> None:
        """The ``on_stop`` callables, then ``process.stop_all`` of every server. Idempotent."""
        while self._leaving:
            try:
                self._leaving.pop()()
            except Exception:  # noqa: BLE001, S110 - the stop must go on whatever on_stop does
                pass
        stop_all(self.processes, self.grace_s, hurry=self.signals.hurried)


def run_supervised(
    argv: Sequence[str],
    *,
    host: str,
    port: int,
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
    the printed curl example). ``host`` and ``port`` were checked where they entered (the flags'
    readers): here they are only bound once, to see that the port is free. Progress goes to stderr.

    Once ``/health`` answers 200: ``on_ready(info)`` (the caller prints ``info.summary_lines()``),
    then ``probe(info)`` if given (the first Ctrl-C / SIGTERM interrupts it with KeyboardInterrupt,
    and the server then stops as for any signal; an exception stops the server and propagates); a
    callable it returns runs next, uninterrupted (for writing its results). Then it serves until
    SIGINT / SIGTERM / SIGHUP, which stop it (``process.stop_all``; a second signal skips the grace
    period) and return 0. A signal while it is still starting also stops it and
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
    port_free(host, port)
    root = server_root_url(host, port)
    server = ServerProcess(argv, log_path=log_path, stdin_data=stdin_data)
    with Supervisor([Supervised(server, root + "/health", health_timeout_s)], grace_s=seams.grace_s,
                    progress_stream=seams.progress_stream, progress_every_s=seams.progress_every_s) as run:
        run.start()
        if not run.wait_ready():
            return 0
        key = api_keys[0] if api_keys else None
        models = tuple(served_models(root, key))
        info = ReadyInfo(host=host, port=port, root_url=root, base_url=root + "/v1",
                         model_name=models[0] if models else (model_name or "MODEL"),
                         served_models=models, pid=server.pid, log_path=server.log_path,
                         startup_s=time.monotonic() - run.started_at, auth=bool(api_keys), api_key=key)
        if on_stop:
            run.on_stop(on_stop)
        if on_ready:
            on_ready(info)
        if probe and not run.requested():
            # The probe may be cut short by the first Ctrl-C / SIGTERM (it keeps its partial
            # results); what it returns (reporting, writing files) runs after that, whole.
            finish = run.interruptible(lambda: probe(info))
            if callable(finish):
                finish()
            if seams.stop_after_probe:
                return 0
        return run.watch()
