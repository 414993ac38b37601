"""``launch proxy start``: the router in supervised child processes (``launcher.scaleout.router``: by
default vllm-router behind launch's front; ``--router lmdeploy``: lmdeploy's proxy and launch's watchdog).

lmdeploy's proxy runs as ``python -m launcher.engine.proxy_server /dev/stdin`` (lmdeploy's own proxy; its spec,
API keys included, comes through a pipe and is never written to disk) in its own process group, its
output in ``<launch cache>/runs/proxy-PORT/proxy.log``. The port is claimed first
(``ports.PortClaim``): a second start on it is refused before it writes anything. The proxy is
ready when ``GET /nodes/status`` answers 200 from its own socket (the proxy has no ``/health``).
Then the watchdog (``launcher.scaleout.watchdog``) runs in a thread of this process until Ctrl-C /
SIGTERM / SIGHUP. The proxy runs under the one ``supervise.Supervisor`` (the one stop policy);
nothing is left running.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from launcher.engine.routing import DEFAULT_ROUTING, check_router, check_routing
from launcher.rules.checks import BadOption
from launcher.runtime.paths import run_dir

DEFAULT_PROXY_HOST = "127.0.0.1"
DEFAULT_PROXY_PORT = 8000
DEFAULT_START_TIMEOUT_S = 120.0  # lmdeploy's proxy imports torch: 4-12 s on a 2-core machine


@dataclass(frozen=True)
class ProxyRequest:
    host: str = DEFAULT_PROXY_HOST
    port: int | str = DEFAULT_PROXY_PORT
    api_keys: tuple[str, ...] = ()  # --api-key flags; LAUNCH_API_KEYS and api_key_file add to them
    api_key_file: Path | None = None
    routing: str = DEFAULT_ROUTING
    router: str | None = None  # None: the default (vllm-router behind launch's front)
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    watch_interval_s: float = 2.0
    watch_timeout_s: float = 2.0


def run_proxy(request: ProxyRequest, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the proxy and its watchdog until a stop signal; 0 after a clean stop.

    Checks everything before starting (host, port free, routing, keys, timeout), then starts,
    waits for ``/nodes/status`` (``ServerStartFailed`` / ``ServerStartTimeout`` with the log's last
    lines), prints the ready lines on ``out`` and the watchdog's changes on ``err``. ``ServerDied``
    if the proxy ends on its own; the proxy is stopped on every path."""
    from launcher.runtime.address import check_port_free, exposure_warnings, say_warnings, validate_host
    from launcher.runtime.apikeys import resolve_api_keys
    from launcher.runtime.ports import PortClaim

    out = out or sys.stdout
    err = err or sys.stderr
    timeout = request.start_timeout_s
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise BadOption("--start-timeout", str(timeout), "must be a number of seconds greater than 0, e.g. 120")
    router = check_router(request.router)
    if router != "lmdeploy" and request.routing != DEFAULT_ROUTING:
        raise BadOption("--routing", request.routing, "is a strategy of lmdeploy's proxy: add --router lmdeploy "
                        "(the default router, vllm-router, routes by load and retries on another replica)")
    routing = check_routing(request.routing)
    host = validate_host(request.host)
    keys = resolve_api_keys(list(request.api_keys), key_file=request.api_key_file) or []
    port = check_port_free(host, request.port)
    if router == "vllm":
        from launcher.scaleout.router import vllm_router_path

        vllm_router_path()  # installed, before anything is written
    with PortClaim(host, [port]):  # before anything is written: a second start on this port stops here
        say_warnings(exposure_warnings(host, port, bool(keys), node_api=router == "lmdeploy"), err)
        return _run_claimed(host, port, routing, keys, router, request, out, err)


def _run_claimed(host: str, port: int, routing: str, keys: Sequence[str], router: str, request: ProxyRequest,
                 out: TextIO, err: TextIO) -> int:
    from launcher.runtime.address import server_root_url
    from launcher.runtime.progress import teller
    from launcher.runtime.supervise import Supervised, Supervisor
    from launcher.scaleout.router import router_run
    from launcher.scaleout.state import clear_state, write_state
    from launcher.scaleout.watchdog import Watchdog

    directory = run_dir(f"proxy-{port}")
    root = server_root_url(host, port)
    run = router_run(router, host, port, keys, routing, directory)
    members = [Supervised(process, url, request.start_timeout_s, timeout_flag="--start-timeout")
               for process, url in zip(run.processes, run.ready_urls, strict=True)]
    watchdog = Watchdog(root, interval_s=request.watch_interval_s, timeout_s=request.watch_timeout_s,
                        report=teller(err), on_change=lambda removed: write_state(port, removed)) \
        if run.watchdog else None
    with Supervisor(members, progress_stream=err) as supervisor:
        supervisor.start()
        if not supervisor.wait_ready():
            return 0
        if watchdog is not None:
            supervisor.on_stop(lambda: (watchdog.stop(), clear_state(port)))
            watchdog.start()
        for line in _ready_lines(run, root, routing, bool(keys), watchdog):
            print(line, file=out)
        out.flush()
        return supervisor.watch()


def _ready_lines(run, root: str, routing: str, keys: bool, watchdog) -> list[str]:
    how = (f"routing {routing}" if run.kind == "lmdeploy" else
           "routes by load, retries a failed request on another replica, checks /health every 2 s")
    lines = [
        f"Proxy ready: {root}  ({run.name}: {how}; Ctrl-C stops it)",
        f"  OpenAI API {root}/v1" + ("   API keys required" if keys else ""),
        f"  add a replica: launch proxy add http://HOST:PORT --proxy {root}",
    ]
    if watchdog is not None:
        removal = watchdog.interval_s * (watchdog.failures + 1) + watchdog.timeout_s
        lines.append(f"  watchdog: /health of each node every {watchdog.interval_s:g} s; a dead or stuck node is "
                     f"taken out within {removal:g} s and added back when it answers")
    else:
        lines.append("  node API (add, remove, status): " + ("with an API key" if keys else "from this machine only"))
    lines += [f"  log {run.log_path}", "  equivalent: " + " ".join(run.equivalent)]
    return lines
