"""``launch serve --replicas N``: lmdeploy's proxy on the public host and port, N supervised
replicas of one engine on loopback ports behind it, each on its own GPUs, one Ctrl-C for all.

The pieces are the single server's and the proxy's: each process is a ``ServerProcess`` (its own
process group, its own log, the one stop rule: SIGTERM, grace, SIGKILL, sweep), readiness is
``supervise.wait_ready`` (the proxy on ``/nodes/status``, each replica on ``/health``), a replica
is registered with ``proxy.add_node`` only once its ``/health`` answers 200, and launch's watchdog
(``proxy_watchdog``) keeps the proxy's node list to the replicas that answer. All processes are
started from the main thread (their parent-death signal is tied to it) and stopped together, in
parallel, on every path out; a replica or the proxy ending on its own stops the rest
(``ServerDied``): a supervisor above launch restarts the whole set.

Standard library only (the processes import what they need).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from launcher.errors import LaunchError
from launcher.plan.layout import ReplicaLayout
from launcher.runtime.process import ServerProcess


class ReplicaNotRegistered(LaunchError):
    """``serve --proxy-url`` / ``--replicas``: the ready replica could not join the proxy; serve
    stops it (a replica the proxy does not know gets no traffic)."""

    url: str
    proxy: str
    reason: str
    message = (
        "{url} is healthy but could not be registered with the proxy at {proxy} ({reason}); it was stopped. "
        "Check the proxy (`launch proxy status --proxy {proxy}`) and serve again."
    )


GRACE_S = 15.0


@dataclass(frozen=True)
class ReplicaRun:
    """What ``run_replicas`` starts: the proxy's spec and run directory, and each replica's server
    command, spec (each spec is handed over on its process's stdin), log and layout entry."""

    proxy_spec: bytes
    proxy_dir: Path
    proxy_host: str  # where the proxy listens (the public --host)
    proxy_port: int
    layout: ReplicaLayout  # the replicas and the proxy's routing
    argvs: tuple[tuple[str, ...], ...]
    specs: tuple[bytes, ...]
    logs: tuple[Path, ...]
    api_keys: tuple[str, ...] = ()
    model_name: str = "MODEL"


def stop_all(servers: Sequence[ServerProcess], grace_s: float, hurry: Callable[[], bool] | None = None) -> None:
    """``ServerProcess.stop`` of every server at once (one grace period for all, not one each)."""
    threads = [threading.Thread(target=s.stop, args=(grace_s,), kwargs={"hurry": hurry}, daemon=True,
                                name=f"stop {s.argv[0]}") for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_replicas(run: ReplicaRun, *, health_timeout_s: float, proxy_timeout_s: float, out: TextIO,
                 grace_s: float = GRACE_S, err: TextIO | None = None) -> int:
    """Start the proxy and the replicas, wait for them, register the replicas, then serve until
    SIGINT / SIGTERM / SIGHUP; 0 after a clean stop. Raises ``ServerStartFailed`` /
    ``ServerStartTimeout`` / ``ReplicaNotRegistered`` while starting and ``ServerDied`` after; every
    process is stopped on every path."""
    from launcher.errors import LaunchError
    from launcher.net import http
    from launcher.runtime.address import server_root_url
    from launcher.runtime.progress import StartProgress
    from launcher.runtime.ready import ReadyInfo
    from launcher.runtime.supervise import ServerDied, StopSignals, wait_ready
    from launcher.scaleout.nodes import add_node
    from launcher.scaleout.proxy import proxy_process
    from launcher.scaleout.state import clear_state, write_state
    from launcher.scaleout.watchdog import Watchdog

    err = err or sys.stderr
    root = server_root_url(run.proxy_host, run.proxy_port)

    def say(line: str) -> None:
        try:
            print(f"launch: {line}", file=err, flush=True)
        except (OSError, ValueError):
            pass

    proxy = proxy_process(run.proxy_spec, run.proxy_dir)
    replicas = [
        ServerProcess(argv, log_path=log, env={**os.environ, **replica.env}, stdin_data=spec)
        for argv, spec, log, replica in zip(run.argvs, run.specs, run.logs, run.layout.replicas)
    ]
    everything = [proxy, *replicas]
    watchdog = Watchdog(root, report=say, on_change=lambda removed: write_state(run.proxy_port, removed))
    key = run.api_keys[0] if run.api_keys else None
    with StopSignals() as signals:
        try:
            started = time.monotonic()
            for server in everything:
                server.start()
            say(f"proxy and {len(replicas)} replica(s) starting; logs in {run.proxy_dir.parent}")
            progress = StartProgress(err, log_path=proxy.log_path)
            if not wait_ready(proxy, root + "/nodes/status", timeout_s=proxy_timeout_s, grace_s=grace_s,
                              progress=progress, stop_requested=signals.requested):
                progress.clear()
                return 0
            deadline = started + health_timeout_s
            for server, replica in zip(replicas, run.layout.replicas):
                progress = StartProgress(err, log_path=server.log_path)
                if not wait_ready(server, replica.url + "/health", timeout_s=max(0.1, deadline - time.monotonic()),
                                  grace_s=grace_s, progress=progress, stop_requested=signals.requested):
                    progress.clear()
                    return 0
                try:
                    add_node(replica.url, root, key)
                except LaunchError as exc:
                    raise ReplicaNotRegistered(replica.url, http.redact(root), str(exc)) from None
                say(f"replica {replica.index} ({replica.url}, GPUs {','.join(replica.devices)}) ready and registered")
            watchdog.start()
            info = ReadyInfo(host=run.proxy_host, port=run.proxy_port, root_url=root, base_url=root + "/v1",
                             model_name=run.model_name, served_models=(run.model_name,), pid=proxy.pid,
                             log_path=proxy.log_path, startup_s=time.monotonic() - started,
                             auth=bool(run.api_keys), api_key=key)
            lines = [
                (f"Serving {run.model_name}: OpenAI API at {root}/v1 through lmdeploy's proxy, "
                f"{len(replicas)} replica(s)  (Ctrl-C stops all)"),
                *(f"  replica {r.index}  {r.url}  GPUs {','.join(r.devices)}  log {log}"
                  for r, log in zip(run.layout.replicas, run.logs)),
                (f"  proxy log {proxy.log_path}   routing {run.layout.routing}; launch's watchdog takes out a replica "
                f"that stops answering /health (`launch proxy status --proxy {root}` lists it)"),
            ]
            if run.layout.total_sessions is not None:
                lines.append(f"  capacity {run.layout.capacity.text('replica')}")
            lines += info.access_lines()
            for line in lines:
                print(line, file=out)
            out.flush()
            while not signals.requested():
                for server in everything:
                    code = server.poll()
                    if code is not None:
                        watchdog.stop()
                        stop_all(everything, grace_s)
                        raise ServerDied(code, str(server.log_path), tuple(server.log_tail()))
                time.sleep(0.1)
            return 0
        finally:
            watchdog.stop()
            clear_state(run.proxy_port)
            stop_all(everything, grace_s, signals.hurried)
