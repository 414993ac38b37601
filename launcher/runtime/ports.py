"""One launch run's claim on the ports it serves (``PortClaim``), and the error of a port taken.

Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from launcher.errors import LaunchError


class PortBusy(LaunchError):
    host: str
    port: int
    problem: str
    message = ("port {port} on {host} is already in use ({problem}). Stop what listens there, or pick "
               "another port with --port.")


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

