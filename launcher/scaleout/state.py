"""What launch's watchdog took out of a proxy, kept where ``launch proxy status`` finds it.

lmdeploy's proxy forgets a node once it is removed; only the process running launch's watchdog
(``launch proxy start``, ``launch serve --replicas``) knows which nodes it took out, when and why.
That process keeps a small JSON file beside the proxy's log, ``<launch cache>/runs/proxy-PORT/
watchdog.json`` (0600, replaced atomically on every change, removed when it stops; node URLs
without credentials; one run per port at a time, ``ports.PortClaim``), and ``launch
proxy status`` reads it, but only when the file can be the queried proxy's: the proxy's host is an
address of this machine (a proxy elsewhere has its own file, on its own machine), the file names
that port, and the process that wrote it still runs (a file left by a killed run is stale; the
writer is its pid and its start time, so a pid used again by another process does not count).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

STATE_NAME = "watchdog.json"
FORMAT = 2  # 2: "started" in seconds after boot (1: in clock ticks)


@dataclass(frozen=True)
class Removed:
    """A node the watchdog took out of the proxy: added back when its ``/health`` answers 200."""

    url: str
    models: tuple[str, ...]
    at: float  # when, in seconds since the epoch
    reason: str  # "/health connection refused (2 checks in a row)"

    @property
    def when(self) -> str:
        """``at`` in ISO 8601, UTC, to the second."""
        return datetime.fromtimestamp(self.at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def started(pid: int) -> float | None:
    """When process ``pid`` started, in seconds after the machine booted (psutil's ``create_time``
    less its ``boot_time``: unlike either, not moved when the clock is set), or None where it does
    not run or cannot be seen."""
    import psutil

    try:
        return psutil.Process(pid).create_time() - psutil.boot_time()
    except (psutil.Error, ValueError):
        return None


# Two readings of one process's start differ by float rounding at most; a pid used again by
# another process within half a second of the first one's start (the pids wrapping round) is not a case.
SAME_START_S = 0.5


def state_json(port: int, pid: int, removed: Sequence[Removed]) -> dict:
    return {"format": FORMAT, "port": port, "pid": pid, "started": started(pid),
            "removed": [{"url": r.url, "models": list(r.models), "removed_at": r.when, "at": r.at,
                         "reason": r.reason} for r in removed]}


def state_path(port: int) -> Path:
    from launcher.runtime.paths import run_dir

    return run_dir(f"proxy-{port}") / STATE_NAME


def write_state(port: int, removed: Sequence[Removed]) -> Path:
    """Record ``removed`` for the proxy on ``port`` (this process as the writer), atomically."""
    from launcher.runtime.paths import write_spec

    path = state_path(port)
    return write_spec(path.parent, path.name, state_json(port, os.getpid(), removed))


def clear_state(port: int) -> None:
    """Remove the state file, only when this process wrote it (its pid is in it)."""
    path = state_path(port)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if _is_writer(data, os.getpid()):
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _is_writer(data: object, pid: object) -> bool:
    """Whether the process ``pid``, running now, is the one that wrote ``data``: the same pid and,
    where the file and the system tell it, the same start time."""
    if not isinstance(data, dict) or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if data.get("pid") != pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded, now = data.get("started"), started(pid)
    if recorded is None or now is None:
        return True
    return isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and abs(recorded - now) < SAME_START_S


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names an address of this machine (it can be bound here)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, kind, proto, _name, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(address)
            return True
        except OSError:
            continue
    return False


def parse_state(data: object, port: int) -> tuple[dict, tuple[Removed, ...]] | None:
    """(the file's content, removed nodes) of a state file's content for ``port``; ``None`` when it
    is not one (another port, another format, malformed)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("port") != port:
        return None
    try:
        removed = tuple(Removed(str(r["url"]), tuple(str(m) for m in r["models"]), float(r["at"]), str(r["reason"]))
                        for r in data["removed"])
    except (KeyError, TypeError, ValueError):
        return None
    return data, removed


def read_state(host: str, port: int) -> tuple[Removed, ...] | None:
    """The nodes the watchdog of the proxy at ``host:port`` took out, or ``None`` when there is no
    state of that proxy here (not on this machine, not run by launch, or its watchdog stopped)."""
    try:
        data = json.loads(state_path(port).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    parsed = parse_state(data, port)
    # the host is looked up last, only when a live watchdog of that port left its record here (the
    # status request has just resolved it, within its deadline)
    if parsed is None or not _is_writer(parsed[0], parsed[0].get("pid")) or not is_this_machine(host):
        return None
    return parsed[1]


def ago(removed: Removed, now: float | None = None) -> str:
    """``"14:50:01 UTC, 12 s ago"``."""
    seconds = max(0, int((time.time() if now is None else now) - removed.at))
    span = f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"
    return f"{removed.when[:10]} {removed.when[11:19]} UTC, {span} ago"
