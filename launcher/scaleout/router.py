"""The router in front of replicas, as its supervised processes: the one place that knows what each router
is made of (``launch proxy start`` and ``launch serve --replicas`` both ask here).

- ``vllm`` (the default): vllm-router on a loopback port of its own, and launch's front
  (``launcher.engine.router_front``) on the public host and port: client keys, the control plane closed to
  clients, lmdeploy's node API. vllm-router retries a failed request on another replica, trips a circuit
  on a failing one and checks health every 2 s itself: no watchdog.
- ``lmdeploy``: lmdeploy's own proxy (``launcher.scaleout.proxy``), with launch's watchdog.

Both answer the same node API (``/nodes/status``, ``/nodes/add``, ``/nodes/remove``), so adding,
removing and listing replicas is the same code for both (``launcher.scaleout.nodes``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.engine.routing import (
    PLACEHOLDERS,
    VLLM_ROUTER,
    placeholder_urls,
    proxy_command,
    vllm_router_command,
)
from launcher.errors import LaunchError

PROXY_LOG = "proxy.log"  # lmdeploy's proxy's
FRONT_LOG = "front.log"
ROUTER_LOG = "router.log"
REQUEST_TIMEOUT_S = 1800.0  # one request through the router, whole (a long-context answer takes minutes)


class RouterMissing(LaunchError):
    where: str
    message = (
        "vllm-router, the default router, is not installed here ({where}): run `make install` (pyproject.toml "
        "pins it), or use --router lmdeploy"
    )


@dataclass(frozen=True)
class RouterRun:
    """A router's processes, not yet started: each with the URL that answers 200 once it is ready."""

    kind: str  # "vllm" or "lmdeploy"
    processes: tuple  # ServerProcess, in start order
    ready_urls: tuple[str, ...]
    watchdog: bool  # launch's watchdog must keep its node list (lmdeploy's proxy)
    equivalent: tuple[str, ...]  # the equivalent command line of the router itself (keys left out)

    @property
    def name(self) -> str:
        return "vllm-router behind launch's front" if self.kind == "vllm" else "lmdeploy's proxy"

    @property
    def log_path(self) -> Path:
        return self.processes[-1].log_path


def vllm_router_path() -> str:
    """The vllm-router console script beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / VLLM_ROUTER
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(VLLM_ROUTER)
    if found is None:
        raise RouterMissing(f"no {VLLM_ROUTER} beside {sys.executable} or on PATH")
    return found


def proxy_spec(host: str, port: int, routing: str, keys: Sequence[str]) -> bytes:
    """The proxy process's spec (``launcher.engine.proxy_server``), handed over on its stdin."""
    return json.dumps({"server_name": host, "server_port": port, "routing_strategy": routing,
                       "api_keys": list(keys)}).encode()


def proxy_process(spec: bytes, directory: Path):
    """The proxy as a (not yet started) ``ServerProcess``: ``python -m launcher.engine.proxy_server
    /dev/stdin`` with ``spec`` (``proxy_spec``) on its stdin, its log in ``directory``. Used by
    ``launch proxy start`` and ``launch serve --replicas``."""
    from launcher.runtime.process import SPEC_ON_STDIN, ServerProcess

    # uvicorn's access lines would be mostly the watchdog's /nodes/status polls; lmdeploy still logs
    # where each request goes ("A request is dispatched to ...").
    env = dict(os.environ)
    env.setdefault("UVICORN_LOG_LEVEL", "warning")
    return ServerProcess([sys.executable, "-m", "launcher.engine.proxy_server", SPEC_ON_STDIN],
                         log_path=directory / PROXY_LOG, env=env, stdin_data=spec)


def front_spec(host: str, port: int, router_url: str, keys: Sequence[str], router: str,
               placeholders: Sequence[str] = ()) -> bytes:
    """The front's spec (``launcher.engine.router_front``), handed over on its stdin (keys never on disk)."""
    return json.dumps({"server_name": host, "server_port": port, "router_url": router_url, "api_keys": list(keys),
                       "router": router, "request_timeout_s": REQUEST_TIMEOUT_S,
                       "placeholders": list(placeholders)}).encode()


def router_run(kind: str, host: str, port: int, keys: Sequence[str], routing: str, directory: Path) -> RouterRun:
    """The processes of router ``kind`` on the public ``host``:``port`` (checked and claimed by the caller),
    their logs in ``directory``."""
    from launcher.runtime.address import free_ports, server_root_url
    from launcher.runtime.process import SPEC_ON_STDIN, ServerProcess

    root = server_root_url(host, port)
    if kind == "lmdeploy":
        proxy = proxy_process(proxy_spec(host, port, routing, keys), directory)
        return RouterRun(kind, (proxy,), (root + "/nodes/status",), True, tuple(proxy_command(host, port, routing)))
    inner = free_ports(2 + PLACEHOLDERS)  # the router, its metrics, the placeholders
    argv = vllm_router_command(inner, inner + 1, REQUEST_TIMEOUT_S, inner + 2)
    router = ServerProcess([vllm_router_path(), *argv[1:]], log_path=directory / ROUTER_LOG)
    front = ServerProcess([sys.executable, "-m", "launcher.engine.router_front", SPEC_ON_STDIN],
                          log_path=directory / FRONT_LOG,
                          stdin_data=front_spec(host, port, f"http://127.0.0.1:{inner}", keys, VLLM_ROUTER,
                                                placeholder_urls(inner + 2)))
    return RouterRun(kind, (router, front), (f"http://127.0.0.1:{inner}/liveness", root + "/health"), False,
                     tuple(argv))
