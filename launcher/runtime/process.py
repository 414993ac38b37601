"""One server command as a child process that launch owns from start to stop, leaving nothing behind.

The child runs in its own process group (``start_new_session``), its stdout and stderr appended to a
log. The stop rule, used on every path: SIGTERM to the group, wait ``grace_s``, then SIGKILL to the
group; afterwards anything left in the group (engine worker processes) is swept the same way. On
Linux the child also gets SIGTERM if launch itself is killed outright (``PR_SET_PDEATHSIG``), so even
``kill -9`` of launch leaves no server running. That signal is tied to the thread that started the
child: start it from the main thread.

Standard library only.
"""

from __future__ import annotations

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


class PortBusy(LaunchError):
    host: str
    port: int
    problem: str
    message = ("port {port} on {host} is already in use ({problem}). Stop what listens there, or pick "
               "another port with --port.")


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


DEFAULT_GRACE_S = 15.0
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


def listening_inodes(port: int) -> set[int] | None:
    """Socket inodes listening on TCP ``port`` here (any address, IPv4 or IPv6), from
    ``/proc/net/tcp{,6}``; ``None`` where there is no such table to read."""
    found: set[int] = set()
    read_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii", errors="replace").splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found if read_any else None


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (``/proc/PID/fd``); empty where unreadable."""
    inodes = set()
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def group_members(pgid: int) -> list[int]:
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

    def listens_on(self, port: int) -> bool | None:
        """Whether a process of this server's group holds a socket listening on ``port``: an answer
        on the port may come from another program that took it first. ``None`` where /proc cannot
        tell (not Linux)."""
        if self._proc is None:
            return False
        listening = listening_inodes(port)
        if listening is None:
            return None
        return any(socket_inodes(pid) & listening for pid in group_members(self._proc.pid))

    def log_tail(self, n: int = TAIL_LINES) -> list[str]:
        """The last ``n`` lines this run wrote to the log."""
        return read_log_tail(self.log_path, n, start=self._log_start)

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
        self.sweep_group()
        return proc.returncode

    def _signal_group(self, signum: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signum)  # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass

    def sweep_group(self, wait_s: float = 2.0) -> None:
        """After the leader has ended, end whatever it left in its group (worker processes)."""
        assert self._proc is not None
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if not group_members(self._proc.pid):
                return
            self._signal_group(signum)
            deadline = time.monotonic() + wait_s
            while group_members(self._proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)


class PortClaim:
    """One launch run's claim on the ports it serves, taken before it writes anything and held until
    it has stopped: an exclusive ``flock`` on ``<launch cache>/runs/ports/PORT.lock`` for each port
    (the kernel lets go when the process ends, however it ends; the file stays, empty but for the
    holder's pid). A second ``launch proxy start`` / ``serve`` on one of those ports is refused
    (``PortBusy``) before it writes a file or starts a process, so two runs never share a run
    directory, a log or a watchdog record. ``host`` is only for the message."""

    def __init__(self, host: str, ports: Sequence[int]) -> None:
        self.host = host
        self.ports = list(dict.fromkeys(ports))
        self._fds: list[int] = []

    def __enter__(self) -> PortClaim:  # noqa: PYI034 - Python 3.10 has no typing.Self
        import fcntl

        from launcher.runtime.paths import RunDirNotWritable, cache_dir

        directory = cache_dir() / "runs" / "ports"
        try:
            for port in self.ports:
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(directory / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    os.close(fd)
                    raise PortBusy(self.host, port, "another launch run on this machine holds it"
                                   + (f" (pid {holder})" if holder.isdigit() else "")) from None
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            self.release()
            raise RunDirNotWritable(str(directory), err.strerror or str(err)) from None
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

