"""``launch proxy status``: the proxy's nodes with their ``/health`` now, which router answers there,
and the nodes launch's watchdog took out (from its state on this machine), as a table or as JSON.
The node API itself is ``launcher.scaleout.nodes``'s."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from launcher.errors import LaunchError, printable
from launcher.net import http, lmdeploy
from launcher.net.lmdeploy import Client, Health, Node
from launcher.scaleout.nodes import NODE_TIMEOUT_S, PROXY_TIMEOUT_S, proxy_nodes, proxy_url
from launcher.scaleout.state import Removed, ago, read_state


@dataclass(frozen=True)
class NodeStatus:
    node: Node
    health: Health


def proxy_status(proxy: str, *, timeout: float = NODE_TIMEOUT_S, key: str | None = None) -> list[NodeStatus]:
    """``launch proxy status``: every node of the proxy, its models and its ``/health`` now
    (checked at once, each within ``timeout``)."""
    proxy = proxy_url(proxy)
    nodes = proxy_nodes(proxy, key=key)
    health = lmdeploy.check_health_all(nodes, timeout)
    return [NodeStatus(nodes[url], health[url]) for url in sorted(nodes)]


def taken_out(proxy: str, registered: Iterable[str] = ()) -> tuple[Removed, ...] | None:
    """The nodes launch's watchdog holds out of the proxy at ``proxy`` (when and why), from the
    state its ``launch proxy start`` / ``serve --replicas`` process keeps on this machine; ``None``
    when there is none here for that proxy. A node in ``registered`` (back since) is left out."""
    parsed = http.parse_url(proxy_url(proxy))
    removed = read_state(parsed.host, parsed.port)
    if removed is None:
        return None
    back = {http.redact(url) for url in registered}  # the record keeps URLs without credentials
    return tuple(r for r in removed if r.url not in back)


@dataclass(frozen=True)
class StatusReport:
    """``launch proxy status``: the registered nodes with their health now, and the nodes launch's
    watchdog took out (``None``: no watchdog state of this proxy on this machine)."""

    proxy: str
    rows: list[NodeStatus]
    removed: tuple[Removed, ...] | None
    router: str = "lmdeploy's proxy"  # which router answers there (``router_name``)


def router_name(proxy: str, key: str | None = None, timeout: float = PROXY_TIMEOUT_S) -> str:
    """Which router answers at ``proxy``: launch's front says so at ``GET /router`` (vllm-router behind it);
    lmdeploy's proxy has no such path."""
    try:
        data = Client(proxy_url(proxy), key, timeout=timeout, option="--proxy").call("GET", "/router", envelope=False)
    except LaunchError:
        return "lmdeploy's proxy"
    name = data.get("router") if isinstance(data, dict) else None
    return f"{printable(str(name))[:40]} behind launch's front" if name else "lmdeploy's proxy"


def status_report(proxy: str, *, timeout: float = NODE_TIMEOUT_S, key: str | None = None) -> StatusReport:
    rows = proxy_status(proxy, timeout=timeout, key=key)
    return StatusReport(proxy, rows, taken_out(proxy, (r.node.url for r in rows)), router_name(proxy, key))


def status_json(proxy: str, rows: Sequence[NodeStatus], removed: Sequence[Removed] | None = None,
                router: str | None = None) -> dict:
    return {
        "proxy": http.redact(proxy_url(proxy)),
        "router": router,
        "nodes": [
            {"url": http.redact(r.node.url), "models": list(r.node.models), "unfinished": r.node.unfinished,
             "healthy": r.health.ok, "health": r.health.detail}
            for r in rows
        ],
        "removed_by_watchdog": None if removed is None else [
            {"url": r.url, "models": list(r.models), "removed_at": r.when, "reason": r.reason} for r in removed
        ],
    }


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Aligned columns; every cell printable (node URLs and model names are whatever anyone registered)."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def render_status(proxy: str, rows: Sequence[NodeStatus], removed: Sequence[Removed] | None = None,
                  router: str | None = None) -> str:
    """The status as a table (one line per node), then the nodes launch's watchdog took out."""
    shown = http.redact(proxy_url(proxy))
    out = f" ({len(removed)} taken out by launch's watchdog)" if removed else ""
    if not rows:
        lines = [f"proxy {shown}: no nodes{out}. Add one with `launch proxy add URL --proxy {shown}`."]
    else:
        lines = [f"proxy {shown}: {len(rows)} node(s), {sum(r.health.ok for r in rows)} healthy{out}"]
        lines += _table([("NODE", "MODELS", "HEALTH", "IN FLIGHT")]
                        + [(http.redact(r.node.url), ", ".join(r.node.models), r.health.detail,
                            "-" if r.node.unfinished is None else str(r.node.unfinished))
                           for r in rows])
    if removed:
        lines.append("taken out by launch's watchdog (added back when its /health answers 200):")
        lines += _table([("NODE", "MODELS", "SINCE", "WHY")]
                        + [(r.url, ", ".join(r.models), ago(r), r.reason) for r in removed])
    if router:
        lines.append(f"router: {router}")
    return "\n".join(lines)
