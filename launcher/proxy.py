"""lmdeploy's proxy (``lmdeploy serve proxy``), driven through its node API: node URLs, node
health, and adding, removing and listing the nodes (``launch proxy add / remove / status``).

What lmdeploy 0.18's proxy does, and what launch adds here (read from its
``serve/proxy/proxy.py`` and measured on 127.0.0.1):

- ``GET /nodes/status`` lists the nodes (``{url: {"models": [...], "unfinished": n, ...}}``);
  ``POST /nodes/add {"url", "status": {"models": [...]}}`` registers a node without probing it
  when ``models`` is filled; ``POST /nodes/remove {"url"}`` removes one. The proxy has no
  ``/health`` of its own, and ``/nodes/*`` need no API key even when it has keys.
- The proxy compares URLs as plain strings: ``http://h:1/`` and ``http://h:1`` are two nodes, and
  ``0.0.0.0`` (where a server listens) is registered as given, unroutable. ``node_url`` normalises.
- A URL alone makes the proxy probe ``/v1/models`` without any API key, and it never checks
  ``/health``. ``add_node`` checks ``/health``, reads the model names itself (with the node's key)
  and registers with ``models`` filled.

All HTTP goes through ``launcher.http`` (one overall deadline per request).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import http
from .errors import (
    BadOption,
    LaunchError,
    NodeBadModels,
    NodeNotHealthy,
    NodeNotRegistered,
    NodeUnauthorized,
    ProxyRefused,
    ProxyUnreachable,
)
from .proxy_state import Removed, ago, read_state

NODE_TIMEOUT_S = 2.0  # one /health or /v1/models request to a node
PROXY_TIMEOUT_S = 5.0  # one node-API request to the proxy
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


# --- URLs --------------------------------------------------------------------------------------


def node_url(url: str, option: str = "URL") -> str:
    """A node's URL as the proxy should store it: ``scheme://host:port``, no trailing ``/``, no
    ``/v1`` base path, no credentials. A wildcard address (``0.0.0.0``, ``::``) is refused: it is
    where a server listens, not an address the proxy can reach."""
    parsed = http.parse_url(url, option)
    if parsed.auth is not None:
        raise BadOption(option, http.redact(url), "give the address without user:password; a node's API key "
                        "goes in --api-key")
    if parsed.host in _WILDCARDS:
        raise BadOption(option, url, f"{parsed.host} is where a server listens, not an address the proxy can "
                        "reach; give this machine's address (127.0.0.1 when the proxy runs here)")
    path = parsed.path.split("?", 1)[0].rstrip("/")
    if path not in ("", "/v1"):
        raise BadOption(option, url, "give the server's root address, such as http://10.0.0.5:23333")
    return parsed.origin


def proxy_url(url: str, option: str = "--proxy") -> str:
    """The proxy's root URL as a client on this machine reaches it (a wildcard host becomes
    loopback); credentials in it are kept (``launcher.http`` sends them as Basic auth)."""
    parsed = http.parse_url(url, option)
    host = "127.0.0.1" if parsed.host in _WILDCARDS else parsed.host
    shown_host = f"[{host}]" if ":" in host else host
    auth = f"{parsed.auth}@" if parsed.auth else ""
    return f"{parsed.scheme}://{auth}{shown_host}:{parsed.port}"


# --- node health -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """The answer of one node's ``GET /health``: ``ok`` only for HTTP 200."""

    url: str
    ok: bool
    detail: str  # "healthy", "HTTP 503", "connection refused", "no answer within 2 s"


def check_health(url: str, timeout: float = NODE_TIMEOUT_S) -> Health:
    """``GET url/health`` within ``timeout`` seconds (a node that accepts and never answers ends
    there too)."""
    try:
        reply = http.get(http.join(url, "/health"), timeout=timeout)
    except http.DeadlineExceeded:
        return Health(url, False, f"no answer within {timeout:g} s")
    except http.Unreachable as err:
        return Health(url, False, err.reason)
    if reply.status == 200:
        return Health(url, True, "healthy")
    return Health(url, False, f"HTTP {reply.status}")


def check_health_all(urls: Iterable[str], timeout: float = NODE_TIMEOUT_S) -> dict[str, Health]:
    """``check_health`` of every URL at once, one thread each: a node that hangs costs ``timeout``
    and does not delay the others' answers."""
    urls = list(dict.fromkeys(urls))
    results = {url: Health(url, False, f"no answer within {timeout:g} s") for url in urls}

    def one(url: str) -> None:
        results[url] = check_health(url, timeout)  # each thread writes its own key

    threads = [threading.Thread(target=one, args=(url,), name=f"health {url}", daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1.0)  # http.get ends by its own deadline; this is only a backstop
    return dict(results)


def served_models(url: str, api_key: str | None = None, timeout: float = NODE_TIMEOUT_S) -> tuple[str, ...]:
    """The model names a node serves (``GET /v1/models``, with ``api_key`` as a bearer key)."""
    try:
        reply, models = http.list_models(url, api_key=api_key, timeout=timeout)
    except (http.Unreachable, http.DeadlineExceeded) as err:
        raise NodeBadModels(url, str(err)) from None
    if reply.status == 401:
        raise NodeUnauthorized(url, bool(api_key))
    if not reply.ok:
        raise NodeBadModels(url, f"HTTP {reply.status}: {reply.detail()}")
    if models is None:
        raise NodeBadModels(url, "the reply is not an OpenAI model list")
    if not models:
        raise NodeBadModels(url, "it lists no model")
    return models


# --- the proxy's node API ----------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node as the proxy knows it."""

    url: str
    models: tuple[str, ...]
    unfinished: int = 0


def proxy_nodes(proxy: str, timeout: float = PROXY_TIMEOUT_S) -> dict[str, Node]:
    """The proxy's nodes (``GET /nodes/status``), by URL."""
    shown = http.redact(proxy)
    try:
        reply = http.get(http.join(proxy, "/nodes/status"), timeout=timeout)
    except (http.Unreachable, http.DeadlineExceeded) as err:
        raise ProxyUnreachable(shown, err.reason if isinstance(err, http.Unreachable) else str(err)) from None
    if not reply.ok:
        raise ProxyUnreachable(shown, f"GET /nodes/status answered HTTP {reply.status}; is it lmdeploy's proxy?")
    try:
        data = reply.json()
        return {
            str(url): Node(str(url), tuple(str(m) for m in (status or {}).get("models") or ()),
                           int((status or {}).get("unfinished") or 0))
            for url, status in data.items()
        }
    except (ValueError, AttributeError, TypeError):
        raise ProxyUnreachable(shown, "GET /nodes/status did not answer with lmdeploy's node list") from None


def _node_call(proxy: str, path: str, body: dict, action: str, timeout: float) -> None:
    shown = http.redact(proxy)
    try:
        reply = http.post(http.join(proxy, path), body, timeout=timeout)
    except (http.Unreachable, http.DeadlineExceeded) as err:
        raise ProxyUnreachable(shown, err.reason if isinstance(err, http.Unreachable) else str(err)) from None
    if not reply.ok:
        raise ProxyRefused(shown, action, f"HTTP {reply.status}: {reply.detail()}")
    try:
        text = reply.json()
    except ValueError:
        text = reply.body.decode("utf-8", "replace")
    # lmdeploy answers 200 with a plain JSON string; failures are strings too ("Failed to add, ...")
    # or its error object ({"error_code": ..., "text": ...}).
    if not isinstance(text, str) or "success" not in text.lower():
        raise ProxyRefused(shown, action, reply.detail())


def register(proxy: str, url: str, models: Sequence[str], timeout: float = PROXY_TIMEOUT_S) -> None:
    """``POST /nodes/add`` with the models filled in (the proxy then registers without probing)."""
    _node_call(proxy, "/nodes/add", {"url": url, "status": {"models": list(models)}}, f"add {url}", timeout)


def deregister(proxy: str, url: str, timeout: float = PROXY_TIMEOUT_S) -> None:
    """``POST /nodes/remove``."""
    _node_call(proxy, "/nodes/remove", {"url": url}, f"remove {url}", timeout)


# --- the commands' library functions -----------------------------------------------------------


def add_node(url: str, proxy: str, api_key: str | None = None, *, timeout: float = NODE_TIMEOUT_S) -> Node:
    """``launch proxy add``: register the node at ``url`` with the proxy at ``proxy``, only once
    its ``/health`` answers 200, with the model names its ``/v1/models`` lists (read with
    ``api_key``). Returns the node as the proxy lists it afterwards."""
    url = node_url(url)
    proxy = proxy_url(proxy)
    proxy_nodes(proxy)  # the proxy answers, before anything is asked of the node
    health = check_health(url, timeout)
    if not health.ok:
        raise NodeNotHealthy(url, health.detail)
    models = served_models(url, api_key, timeout)
    register(proxy, url, models)
    node = proxy_nodes(proxy).get(url)
    if node is None or tuple(node.models) != models:
        raise ProxyRefused(http.redact(proxy), f"add {url}", "the node is not in its node list afterwards")
    return node


def remove_node(url: str, proxy: str) -> Node:
    """``launch proxy remove``: take the node at ``url`` out of the proxy. Refused (listing the
    proxy's nodes) when it is not one of them."""
    url = node_url(url)
    proxy = proxy_url(proxy)
    nodes = proxy_nodes(proxy)
    if url not in nodes:
        raise NodeNotRegistered(url, http.redact(proxy), tuple(nodes))
    deregister(proxy, url)
    if url in proxy_nodes(proxy):
        raise ProxyRefused(http.redact(proxy), f"remove {url}", "the node is still in its node list afterwards")
    return nodes[url]


def advertise_url(host: str, port: int, advertise: str | None = None) -> str:
    """The URL a replica registers under: ``advertise`` (``--advertise-url``) normalised, else the
    address it listens on. A wildcard listen address needs ``advertise``: the proxy cannot reach
    ``0.0.0.0``, and which of this machine's addresses it can reach is not for launch to guess."""
    if advertise:
        return node_url(advertise, "--advertise-url")
    if host.strip("[]") in _WILDCARDS:
        raise BadOption("--advertise-url", "", f"the server listens on all interfaces ({host}); give the address "
                        "the proxy reaches it at, e.g. --advertise-url http://10.0.0.5:23333")
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return node_url(f"http://{shown}:{port}", "--host")


def leave(url: str, proxy: str) -> bool:
    """Take a stopping replica out of the proxy. ``False`` (never an error: a stop must not fail
    for it) when it was not registered or the proxy does not answer."""
    try:
        remove_node(url, proxy)
    except LaunchError:
        return False
    return True


@dataclass(frozen=True)
class NodeStatus:
    node: Node
    health: Health


def proxy_status(proxy: str, *, timeout: float = NODE_TIMEOUT_S) -> list[NodeStatus]:
    """``launch proxy status``: every node of the proxy, its models and its ``/health`` now
    (checked at once, each within ``timeout``)."""
    proxy = proxy_url(proxy)
    nodes = proxy_nodes(proxy)
    health = check_health_all(nodes, timeout)
    return [NodeStatus(nodes[url], health[url]) for url in sorted(nodes)]


def taken_out(proxy: str, registered: Iterable[str] = ()) -> tuple[Removed, ...] | None:
    """The nodes launch's watchdog holds out of the proxy at ``proxy`` (when and why), from the
    state its ``launch proxy start`` / ``serve --replicas`` process keeps on this machine; ``None``
    when there is none here for that proxy. A node in ``registered`` (back since) is left out."""
    parsed = http.parse_url(proxy_url(proxy))
    removed = read_state(parsed.host, parsed.port)
    if removed is None:
        return None
    back = set(registered)
    return tuple(r for r in removed if r.url not in back)


@dataclass(frozen=True)
class StatusReport:
    """``launch proxy status``: the registered nodes with their health now, and the nodes launch's
    watchdog took out (``None``: no watchdog state of this proxy on this machine)."""

    proxy: str
    rows: list[NodeStatus]
    removed: tuple[Removed, ...] | None


def status_report(proxy: str, *, timeout: float = NODE_TIMEOUT_S) -> StatusReport:
    rows = proxy_status(proxy, timeout=timeout)
    return StatusReport(proxy, rows, taken_out(proxy, (r.node.url for r in rows)))


def status_json(proxy: str, rows: Sequence[NodeStatus], removed: Sequence[Removed] | None = None) -> dict:
    return {
        "proxy": http.redact(proxy_url(proxy)),
        "nodes": [
            {"url": r.node.url, "models": list(r.node.models), "unfinished": r.node.unfinished,
             "healthy": r.health.ok, "health": r.health.detail}
            for r in rows
        ],
        "removed_by_watchdog": None if removed is None else [
            {"url": r.url, "models": list(r.models), "removed_at": r.when, "reason": r.reason} for r in removed
        ],
    }


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def render_status(proxy: str, rows: Sequence[NodeStatus], removed: Sequence[Removed] | None = None) -> str:
    """The status as a table (one line per node), then the nodes launch's watchdog took out."""
    shown = http.redact(proxy_url(proxy))
    out = f" ({len(removed)} taken out by launch's watchdog)" if removed else ""
    if not rows:
        lines = [f"proxy {shown}: no nodes{out}. Add one with `launch proxy add URL --proxy {shown}`."]
    else:
        lines = [f"proxy {shown}: {len(rows)} node(s), {sum(r.health.ok for r in rows)} healthy{out}"]
        lines += _table([("NODE", "MODELS", "HEALTH", "IN FLIGHT")]
                        + [(r.node.url, ", ".join(r.node.models), r.health.detail, str(r.node.unfinished))
                           for r in rows])
    if removed:
        lines.append("taken out by launch's watchdog (added back when its /health answers 200):")
        lines += _table([("NODE", "MODELS", "SINCE", "WHY")]
                        + [(r.url, ", ".join(r.models), ago(r), r.reason) for r in removed])
    return "\n".join(lines)
