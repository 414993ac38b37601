"""``serve --proxy-url``: this server joins a proxy (launch's router or lmdeploy's) once it is ready, and
leaves it when it stops."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from launcher.rules.checks import BadOption


@dataclass(frozen=True)
class Joining:
    """``--proxy-url``: the proxy (normalised, credentials kept for the requests) and the URL this
    server registers under."""

    proxy: str
    url: str


def check_joining(request) -> Joining | None:
    """``--proxy-url`` / ``--advertise-url`` of a checked serve request (``app.serve.ServeRequest``),
    checked against each other and the layout (no request)."""
    from launcher.scaleout.nodes import advertise_url, proxy_url

    scale = request.plan
    if request.probe and scale.scale_out == "replicas":
        raise BadOption("--probe", "with --replicas", "probes one engine: serve the replicas, then `launch probe --url "
                        "http://127.0.0.1:PORT+1` for the first replica (or the proxy's PORT for all)")
    if request.proxy_url is None:
        if request.advertise_url is not None:
            raise BadOption("--advertise-url", request.advertise_url, "is the URL a proxy reaches this server at: "
                            "give --proxy-url too")
        return None
    if scale.scale_out == "replicas":
        raise BadOption("--proxy-url", request.proxy_url, "--replicas runs its own proxy on --port; serve one "
                        "replica per command to join another proxy")
    if scale.scale_out == "nodes" and scale.node_rank:
        raise BadOption("--proxy-url", request.proxy_url, "only rank 0 serves HTTP: give --proxy-url on node 0")
    from launcher.net import http
    from launcher.runtime.address import is_loopback

    joining = Joining(proxy_url(request.proxy_url, "--proxy-url"),
                      advertise_url(scale.host, scale.port, request.advertise_url))
    own, proxy_host = http.parse_url(joining.url).host, http.parse_url(joining.proxy).host
    if is_loopback(own) and not is_loopback(proxy_host):
        raise BadOption("--advertise-url", joining.url, f"the proxy at {proxy_host} cannot reach this machine's loopback "
                        "address; serve with --host 0.0.0.0 (or this machine's address) and --advertise-url "
                        "http://THIS-MACHINE:PORT")
    return joining


def join_hooks(joining: Joining, out: TextIO) -> tuple[Callable, Callable]:
    """(on ready: register with the proxy, or stop serving; on stop: leave the proxy)."""
    from launcher.errors import LaunchError
    from launcher.net import http
    from launcher.scaleout.nodes import add_node, leave
    from launcher.scaleout.replicas import ReplicaNotRegistered

    shown = http.redact(joining.proxy)
    joined: list[bool] = []

    keys: list[str | None] = []

    def join(info) -> None:
        keys.append(info.api_key)  # the server's key: sent to the router's node API too (the same keys on both)
        try:
            add_node(joining.url, joining.proxy, info.api_key)
        except LaunchError as exc:
            raise ReplicaNotRegistered(joining.url, shown, str(exc)) from None
        joined.append(True)
        print(f"  registered with the proxy at {shown} as {joining.url} (it leaves the proxy when stopped)",
              file=out)

    def part() -> None:
        if not joined:  # never registered: nothing to take out
            return
        left = leave(joining.url, joining.proxy, keys[0] if keys else None)
        print(f"launch: {'left' if left else 'could not leave (not registered, or it does not answer)'} "
              f"the proxy at {shown}", file=sys.stderr, flush=True)

    return join, part
