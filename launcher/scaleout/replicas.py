"""``launch serve --replicas N``: the router on the public host and port (``launcher.scaleout.router``:
vllm-router behind launch's front, or ``--router lmdeploy``), N supervised replicas of one engine on
loopback ports behind it, each on its own GPUs, one Ctrl-C for all.

The pieces are the single server's and the proxy's: each process is a ``ServerProcess`` (its own
process group, its own log), and one ``supervise.Supervisor`` runs them all: it waits for the proxy
(``/nodes/status``), then for each replica (``/health``), which is registered with
``nodes.add_node`` once ready; with lmdeploy's proxy, launch's watchdog (``scaleout.watchdog``) then
keeps its node list to the replicas that answer (vllm-router checks /health itself). Every process is stopped together, by the one stop policy, on
every path out; a replica or the proxy ending on its own stops the rest (``ServerDied``): a
supervisor above launch restarts the whole set.

Standard library only (the processes import what they need).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
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


@dataclass(frozen=True)
class ReplicaRun:
    """What ``run_replicas`` starts: the proxy's spec and run directory, and each replica's server
    command, spec (each spec is handed over on its process's stdin), log and layout entry."""

    router: str  # "vllm" or "lmdeploy" (launcher.scaleout.router)
    proxy_dir: Path
    proxy_host: str  # where the proxy listens (the public --host)
    proxy_port: int
    layout: ReplicaLayout  # the replicas and the proxy's routing
    argvs: tuple[tuple[str, ...], ...]
    specs: tuple[bytes, ...]
    logs: tuple[Path, ...]
    api_keys: tuple[str, ...] = ()
    model_name: str = "MODEL"


def run_replicas(run: ReplicaRun, *, health_timeout_s: float, proxy_timeout_s: float, out: TextIO,
                 err: TextIO | None = None) -> int:
    """Start the proxy and the replicas, wait for them, register the replicas, then serve until
    SIGINT / SIGTERM / SIGHUP; 0 after a clean stop. Raises ``ServerStartFailed`` /
    ``ServerStartTimeout`` / ``ReplicaNotRegistered`` while starting and ``ServerDied`` after; every
    process is stopped on every path."""
    from launcher.runtime.address import server_root_url
    from launcher.runtime.progress import teller
    from launcher.runtime.ready import ReadyInfo
    from launcher.runtime.supervise import Supervised, Supervisor
    from launcher.scaleout.router import router_run
    from launcher.scaleout.state import clear_state, write_state
    from launcher.scaleout.watchdog import Watchdog

    err = err or sys.stderr
    say = teller(err)
    root = server_root_url(run.proxy_host, run.proxy_port)
    key = run.api_keys[0] if run.api_keys else None
    router = router_run(run.router, run.proxy_host, run.proxy_port, run.api_keys, run.layout.routing, run.proxy_dir)
    proxy = router.processes[-1]
    members = [Supervised(process, url, proxy_timeout_s) for process, url in
               zip(router.processes, router.ready_urls, strict=True)]
    routers = len(members)
    for argv, spec, log, replica in zip(run.argvs, run.specs, run.logs, run.layout.replicas, strict=True):
        server = ServerProcess(argv, log_path=log, env={**os.environ, **replica.env}, stdin_data=spec)
        members.append(Supervised(server, replica.url + "/health", health_timeout_s,
                                  when_ready=_registering(replica, root, key, say)))
    watchdog = Watchdog(root, report=say, on_change=lambda removed: write_state(run.proxy_port, removed)) \
        if router.watchdog else None
    with Supervisor(members, progress_stream=err) as supervisor:
        supervisor.start()
        say(f"{router.name} and {len(members) - routers} replica(s) starting; logs in {run.proxy_dir.parent}")
        if not supervisor.wait_ready():
            return 0
        if watchdog is not None:
            supervisor.on_stop(lambda: (watchdog.stop(), clear_state(run.proxy_port)))
            watchdog.start()
        info = ReadyInfo(host=run.proxy_host, port=run.proxy_port, root_url=root, base_url=root + "/v1",
                         model_name=run.model_name, served_models=(run.model_name,), pid=proxy.pid,
                         log_path=proxy.log_path, startup_s=time.monotonic() - supervisor.started_at,
                         auth=bool(run.api_keys), api_key=key)
        for line in _ready_lines(run, info, router):
            print(line, file=out)
        out.flush()
        return supervisor.watch()


def _registering(replica, root: str, key: str | None, say: Callable[[str], None]) -> Callable[[], None]:
    """What runs once ``replica`` is ready: its registration with the proxy at ``root``."""

    def register() -> None:
        from launcher.errors import LaunchError
        from launcher.net import http
        from launcher.scaleout.nodes import add_node

        try:
            add_node(replica.url, root, key)
        except LaunchError as exc:
            raise ReplicaNotRegistered(replica.url, http.redact(root), str(exc)) from None
        say(f"replica {replica.index} ({replica.url}, GPUs {','.join(replica.devices)}) ready and registered")

    return register


def _ready_lines(run: ReplicaRun, info, router) -> list[str]:
    """What the user is told once the router and every replica are ready (``info``: the router's)."""
    root = info.root_url
    how = (f"routing {run.layout.routing}; launch's watchdog takes out a replica that stops answering /health"
           if router.watchdog else "it retries a failed request on another replica and takes out one that stops "
           "answering /health")
    lines = [
        (f"Serving {run.model_name}: OpenAI API at {root}/v1 through {router.name}, "
         f"{len(run.layout.replicas)} replica(s)  (Ctrl-C stops all)"),
        *(f"  replica {r.index}  {r.url}  GPUs {','.join(r.devices)}  log {log}"
          for r, log in zip(run.layout.replicas, run.logs, strict=True)),
        f"  router log {info.log_path}   {how} (`launch proxy status --proxy {root}` lists them)",
    ]
    if run.layout.total_sessions is not None:
        lines.append(f"  capacity {run.layout.capacity.text('replica')}")
    return lines + info.access_lines()
