"""One server command as a child process that launch owns from start to stop, leaving nothing behind.

The child runs in its own process group (``start_new_session``), its stdout and stderr appended to a
log. The one stop policy (``stop_all``), used on every path and for any number of servers at once:
SIGTERM to each server's group and to the processes it started, ``GRACE_S`` for all of them
together, then SIGKILL; afterwards whatever is left (engine worker processes, in the group or
started by it) is swept the same way. On Linux the child also gets SIGTERM if launch itself is
killed outright (``PR_SET_PDEATHSIG``), so even ``kill -9`` of launch leaves no server running. That
signal is tied to the thread that started the child: start it from the main thread.

Processes are inspected through psutil (process trees, start times, listening sockets), imported
only here, inside the functions that run or inspect processes: ``launch --help``, ``plan`` and
``presets`` never load it.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from launcher.errors import LaunchError


class ServerNotStarted(LaunchError):
    command: str
    problem: str
    message = "cannot start the server ({command}): {problem}"


class ServerLogNotWritable(LaunchError):
    path: str
    problem: str
    message = "cannot write the server log {path}: {problem}. Free some space or fix the permissions there."


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``: a negative code is a signal."""
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


def _with_tail(first_line: str, tail: tuple[str, ...]) -> str:
    if not tail:
        return first_line + " The log is empty."
    return first_line + " Last log lines:\n" + "\n".join(f"  | {line}" for line in tail)


GRACE_S = 15.0  # the one grace period between SIGTERM and SIGKILL, for every server launch runs
SWEEP_WAIT_S = 2.0  # what is left once a server ended: this long after SIGTERM, then after SIGKILL
TAIL_LINES = 20
# The spec path a serving process is given when its spec comes through its stdin (``stdin_data``):
# its API keys are then never written to disk, and two runs never share a spec file.
SPEC_ON_STDIN = "/dev/stdin"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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


def _feed(pipe, data: bytes) -> None:
    """Write ``data`` to a child's stdin and close it (a child that ends first only breaks the pipe)."""
    try:
        with pipe:
            pipe.write(data)
    except OSError:
        pass


def _psutil():
    """psutil, imported where processes are inspected (never at ``launch --help`` or ``plan``)."""
    import psutil

    return psutil


def _group(pgid: int) -> list:
    """Live (non-zombie) processes of process group ``pgid``, as ``psutil.Process``."""
    psutil = _psutil()
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):  # ended meanwhile
            continue
    return members


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in process group ``pgid``."""
    return [proc.pid for proc in _group(pgid)]


class ServerProcess:
    """One server command run in its own process group, its stdout and stderr appended to a log.

    ``env`` is the child's whole environment (``None``: inherit this one); ``PYTHONUNBUFFERED=1`` is
    added unless set, so the log (and the progress line) shows output as it happens. Usable as a
    context manager: leaving the block stops the server.
    """

    def __init__(self, argv: Sequence[str], *, log_path: Path | str, env: Mapping[str, str] | None = None,
                 cwd: Path | str | None = None, stdin_data: bytes | None = None) -> None:
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not one string")
        self.argv = [os.fspath(arg) for arg in argv]
        if not self.argv:
            raise ValueError("argv is empty")
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.stdin_data = stdin_data  # handed over through a pipe (a spec with API keys: never on disk)
        self._proc: subprocess.Popen | None = None
        self._log_start = 0
        self._tree: set = set()  # psutil.Process of every descendant seen (pid and start time: no reused pid)

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> ServerProcess:
        if self._proc is not None:
            raise RuntimeError("this ServerProcess was already started")
        try:
            self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # the user's alone (a server logs its requests' URLs): 0600, never through a link; an older
            # launch's 0644 log of this run is tightened
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)
            log = os.fdopen(fd, "ab")
        except OSError as exc:
            problem = "it is a symbolic link; launch does not write through links" if exc.errno == errno.ELOOP \
                else exc.strerror or str(exc)
            raise ServerLogNotWritable(str(self.log_path), problem) from None
        with log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== launch {stamp}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            piped = self.stdin_data is not None
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.PIPE if piped else subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True,
                    preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - one prctl call, nothing else
                )
            except OSError as exc:
                raise ServerNotStarted(self.argv[0], exc.strerror or str(exc)) from None
        if piped:
            # written from a thread: a payload larger than the pipe holds waits for the child to read it
            threading.Thread(target=_feed, args=(self._proc.stdin, self.stdin_data), daemon=True,
                             name="stdin").start()
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

    def note_tree(self) -> None:
        """Remember the processes the server has started so far (its whole tree, while it runs): a
        worker that leaves its process group, or whose parent ended, is still swept at the stop."""
        if self._proc is None or self._proc.poll() is not None:
            return
        psutil = _psutil()
        try:
            self._tree.update(psutil.Process(self._proc.pid).children(recursive=True))
        except psutil.Error:  # ended meanwhile
            pass

    def _processes(self) -> list:
        """Every live process of this server: the leader while it runs, the processes it started
        (seen now or before), the members of its group; no zombie, no pid used again by another."""
        self.note_tree()
        found = {proc.pid: proc for proc in _group(self._proc.pid)} if self._proc is not None else {}
        found.update((proc.pid, proc) for proc in self._tree if proc.pid not in found and not _ended(proc))
        return list(found.values())

    def listens_on(self, port: int) -> bool | None:
        """Whether a process of this server holds a socket listening on TCP ``port``: an answer on
        the port may come from another program that took it first. ``None`` where the system does
        not let launch see a process's sockets."""
        if self._proc is None:
            return False
        psutil = _psutil()
        unknown = False
        for proc in self._processes():
            try:
                sockets = proc.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            except (psutil.AccessDenied, NotImplementedError):
                unknown = True
                continue
            if any(s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port for s in sockets):
                return True
        return None if unknown else False

    def log_tail(self, n: int = TAIL_LINES) -> list[str]:
        """The last ``n`` lines this run wrote to the log."""
        return read_log_tail(self.log_path, n, start=self._log_start)

    # -- stop -----------------------------------------------------------------------------------
    def stop(self, grace_s: float = GRACE_S, *, hurry: Callable[[], bool] | None = None) -> int | None:
        """``stop_all`` of this server alone. Idempotent; returns the exit code (None if never started)."""
        stop_all([self], grace_s, hurry=hurry)
        return None if self._proc is None else self._proc.returncode

    def sweep(self) -> None:
        """After the server has ended on its own, end whatever it left (``stop_all`` without the wait)."""
        stop_all([self], 0.0)

    def _signal(self, signum: int) -> None:
        """``signum`` to the server's process group and to the processes it started elsewhere."""
        assert self._proc is not None
        psutil = _psutil()
        try:
            os.killpg(self._proc.pid, signum)  # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass
        for proc in self._tree:  # those that left the group (each process gets the signal once)
            try:
                if os.getpgid(proc.pid) != self._proc.pid:
                    proc.send_signal(signum)  # psutil: never to a pid another process has taken since
            except (OSError, psutil.Error):
                pass


def stop_all(servers: Sequence[ServerProcess], grace_s: float = GRACE_S, *,
             hurry: Callable[[], bool] | None = None) -> None:
    """THE stop policy, for any number of servers at once: SIGTERM to every running server's group
    and tree, up to ``grace_s`` seconds for all of them together (``hurry()`` turning true, a second
    Ctrl-C, skips the rest), SIGKILL to those still running; each leader is reaped; then whatever
    they left is swept (``SWEEP_WAIT_S`` after SIGTERM, then SIGKILL). Idempotent."""
    started = [server for server in servers if server._proc is not None]
    running = [server for server in started if server._proc.poll() is None]
    for server in running:
        server.note_tree()
        server._signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (any(server._proc.poll() is None for server in running) and time.monotonic() < deadline
           and not (hurry and hurry())):
        time.sleep(0.05)
    for server in running:
        if server._proc.poll() is None:
            server._signal(signal.SIGKILL)
    for server in started:
        server._proc.wait()
    _sweep(started)


def _sweep(servers: Sequence[ServerProcess]) -> None:
    """End what the (ended) servers left: SIGTERM, up to ``SWEEP_WAIT_S``, SIGKILL, up to ``SWEEP_WAIT_S``."""
    psutil = _psutil()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        left = [proc for server in servers for proc in server._processes()]
        if not left:
            return
        for proc in left:
            try:
                proc.send_signal(signum)
            except psutil.Error:
                pass
        # not psutil.wait_procs: it waits for a zombie (ended, its parent has not reaped it yet) as
        # for a running process, and an orphan's zombie may never be reaped in a container
        deadline = time.monotonic() + SWEEP_WAIT_S
        while not all(_ended(proc) for proc in left) and time.monotonic() < deadline:
            time.sleep(0.05)


def _ended(proc) -> bool:
    """Whether ``proc`` (a ``psutil.Process``) has ended: gone, a zombie, or its pid another's now."""
    psutil = _psutil()
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
