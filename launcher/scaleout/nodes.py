"""lmdeploy's proxy (``lmdeploy serve proxy``), driven through its node API: node URLs, node
health, and adding, removing and listing the nodes (``launch proxy add / remove``; the status report
that lists them is ``launcher.scaleout.status``).

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

The endpoints, their JSON and their errors are known once, in ``launcher.net.lmdeploy`` (the one
client, on ``launcher.net.http``: one overall deadline per request); here its errors are said in the
proxy commands' words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from launcher.errors import LaunchError
from launcher.net import http, lmdeploy
from launcher.net.lmdeploy import Client, Node
from launcher.rules.checks import BadOption


class ProxyUnreachable(LaunchError):
    url: str
    reason: str
    message = (
        "the proxy at {url} does not answer its node API ({reason}). Is `launch proxy start` running "
        "there? Check --proxy."
    )


class ProxyRefused(LaunchError):
    """The proxy's node API answered, but not with success."""

    url: str
    action: str
    detail: str
    message = "the proxy at {url} refused to {action}: {detail}"


class NodeNotHealthy(LaunchError):
    url: str
    detail: str
    message = (
        "the node at {url} is not healthy ({detail}); launch registers a node only once its /health "
        "answers 200. Wait until its server is ready (`launch serve` prints a ready line), then add it again."
    )


class NodeUnauthorized(LaunchError):
    url: str
    with_key: bool
    exit_code = 2

    def message(self) -> str:
        if self.with_key:
            return (f"the node at {self.url} rejected the API key given with --api-key (HTTP 401 on "
                    "/v1/models). Give one of the keys that server was started with.")
        return (f"the node at {self.url} needs an API key (HTTP 401 on /v1/models): give it with "
                "--api-key KEY (or LAUNCH_API_KEY).")


class NodeBadModels(LaunchError):
    url: str
    detail: str
    message = (
        "cannot read the served model names from {url}/v1/models ({detail}); is it an lmdeploy "
        "api_server (`launch serve`)?"
    )


class NodeNotRegistered(LaunchError):
    url: str
    proxy: str
    known: tuple[str, ...]
    exit_code = 2

    def message(self) -> str:
        known = ", ".join(self.known) if self.known else "none"
        return (f"{self.url} is not a node of the proxy at {self.proxy} (its nodes: {known}). "
                "See `launch proxy status --proxy URL`.")


NODE_TIMEOUT_S = 2.0  # one /health or /v1/models request to a node
PROXY_TIMEOUT_S = 5.0  # one node-API request to the proxy


# --- URLs --------------------------------------------------------------------------------------


def node_url(url: str, option: str = "URL") -> str:
    """A node's URL as the proxy should store it: ``scheme://host:port``, no trailing ``/``, no
    ``/v1`` base path, no credentials, the host in its one canonical spelling (``address.check_host``:
    ``127.1``, ``2130706433`` and ``[::ffff:127.0.0.1]`` are all ``127.0.0.1``). A wildcard address
    (``0.0.0.0``, ``::``) is refused: it is where a server listens, not an address the proxy can reach."""
    from launcher.runtime.address import check_host, is_wildcard

    parsed = http.parse_url(url, option)
    shown = http.redact(url)
    if parsed.auth is not None:
        raise BadOption(option, shown, "give the address without user:password; a node's API key goes in --api-key")
    try:
        host = check_host(parsed.host, option, "give the server's address, e.g. http://10.0.0.5:23333")
    except BadOption as err:
        raise BadOption(option, shown, err.reason) from None
    if is_wildcard(host):
        raise BadOption(option, shown, f"{host} is where a server listens, not an address the proxy can reach; give "
                        "this machine's address (127.0.0.1 when the proxy runs here)")
    if not 1 <= parsed.port <= 65535:
        raise BadOption(option, shown, "the port must be from 1 to 65535, e.g. http://10.0.0.5:23333")
    path = parsed.path.split("?", 1)[0].rstrip("/")
    if path not in ("", "/v1"):
        raise BadOption(option, shown, "give the server's root address, such as http://10.0.0.5:23333")
    return http.Url(parsed.scheme, host, parsed.port, "/", None).origin


def same_node(url: str, urls: Iterable[str], timeout: float = NODE_TIMEOUT_S,
              cache: dict[str, frozenset[str]] | None = None) -> str | None:
    """The first of ``urls`` that names the same server as ``url`` (both spelled by ``node_url``):
    the same scheme and port, and a host standing for a common address (``localhost`` and
    ``127.0.0.1``; a name and the address it resolves to, looked up within ``timeout``). The proxy
    would count the two as two nodes and give that server two shares. URLs ``node_url`` refuses are
    passed over. ``cache``: what hosts were found to stand for, kept across calls (the watchdog's)."""
    from launcher.runtime.address import host_addresses

    def key(text: str) -> http.Url | None:
        try:
            return http.parse_url(node_url(http.redact(text)))  # credentials in a URL do not make another node
        except LaunchError:
            return None

    mine = key(url)
    others = [(other, key(other)) for other in urls]
    others = [(other, parsed) for other, parsed in others
              if parsed is not None and mine is not None and (parsed.scheme, parsed.port) == (mine.scheme, mine.port)]
    if mine is None or not others:
        return None
    cache = {} if cache is None else cache
    hosts = [mine.host, *(parsed.host for _, parsed in others)]
    cache.update(host_addresses([h for h in hosts if h not in cache], timeout))
    addresses = cache
    for other, parsed in others:
        if addresses[parsed.host] & addresses[mine.host]:
            return other
    return None


def proxy_url(url: str, option: str = "--proxy") -> str:
    """The proxy's root URL as a client on this machine reaches it (a wildcard host becomes
    loopback; the host checked and spelled by ``address.check_host``); credentials in it are kept
    (``launcher.net.http`` sends them as Basic auth)."""
    from launcher.runtime.address import check_host, client_host

    parsed = http.parse_url(url, option)
    try:
        host = client_host(check_host(parsed.host, option, "give the proxy's address, e.g. http://10.0.0.1:8000"))
    except BadOption as err:
        raise BadOption(option, http.redact(url), err.reason) from None
    shown_host = f"[{host}]" if ":" in host else host
    auth = f"{parsed.auth}@" if parsed.auth else ""
    return f"{parsed.scheme}://{auth}{shown_host}:{parsed.port}"


# --- the node API, in the proxy commands' words ------------------------------------------------

T = TypeVar("T")


def node_models(url: str, api_key: str | None = None, timeout: float = NODE_TIMEOUT_S) -> tuple[str, ...]:
    """The model names a node serves (``GET /v1/models``, with ``api_key`` as a bearer key)."""
    try:
        models = Client(url, api_key, timeout).models()
    except (http.Unreachable, http.DeadlineExceeded) as err:
        raise NodeBadModels(url, str(err)) from None
    except lmdeploy.ServerUnauthorized:
        raise NodeUnauthorized(url, bool(api_key)) from None
    except lmdeploy.ServerHTTPError as err:
        raise NodeBadModels(url, f"HTTP {err.status}: {err.detail}") from None
    except lmdeploy.ServerErrorBody as err:
        raise NodeBadModels(url, f"error_code {err.code}: {err.detail}") from None
    except lmdeploy.ServerBadReply as err:
        raise NodeBadModels(url, err.problem) from None
    if not models:
        raise NodeBadModels(url, "it lists no model")
    return tuple(models)


def _reason(err: http.Unreachable | http.DeadlineExceeded) -> str:
    return err.reason if isinstance(err, http.Unreachable) else str(err)


def proxy_nodes(proxy: str, timeout: float = PROXY_TIMEOUT_S, key: str | None = None) -> dict[str, Node]:
    """The proxy's nodes (``GET /nodes/status``), by URL. ``key``: an API key of the router (launch's front
    asks one for its node API when it has keys; lmdeploy's proxy asks none)."""
    shown = http.redact(proxy)
    try:
        return Client(proxy, key, timeout=timeout, option="--proxy").nodes()
    except (http.Unreachable, http.DeadlineExceeded) as err:
        raise ProxyUnreachable(shown, _reason(err)) from None
    except lmdeploy.ServerHTTPError as err:
        if err.status == 403:  # launch's front without keys: its node API answers its own machine only
            raise ProxyRefused(shown, "list its nodes", err.detail) from None
        raise ProxyUnreachable(shown, f"GET /nodes/status answered HTTP {err.status}; is it launch's router?") from None
    except lmdeploy.ServerUnauthorized:
        raise ProxyRefused(shown, "list its nodes", "its node API needs one of its API keys: give --api-key KEY "
                           "(or LAUNCH_API_KEY)" if key is None else "it rejected the API key given") from None
    except lmdeploy.ServerBadReply:
        raise ProxyUnreachable(shown, "GET /nodes/status did not answer with lmdeploy's node list") from None


def _node_call(proxy: str, action: str, timeout: float, call: Callable[[Client], T], key: str | None = None) -> T:
    shown = http.redact(proxy)
    try:
        return call(Client(proxy, key, timeout=timeout, option="--proxy"))
    except (http.Unreachable, http.DeadlineExceeded) as err:
        raise ProxyUnreachable(shown, _reason(err)) from None
    except lmdeploy.ServerUnauthorized as err:
        raise ProxyRefused(shown, action, f"HTTP 401: {err.detail}") from None
    except lmdeploy.ServerHTTPError as err:
        raise ProxyRefused(shown, action, f"HTTP {err.status}: {err.detail}") from None
    except (lmdeploy.ServerErrorBody, lmdeploy.ServerRefused) as err:
        raise ProxyRefused(shown, action, err.detail) from None
    except lmdeploy.ServerBadReply as err:
        raise ProxyRefused(shown, action, err.problem) from None


def register(proxy: str, url: str, models: Sequence[str], timeout: float = PROXY_TIMEOUT_S,
             key: str | None = None) -> None:
    """``POST /nodes/add`` with the models filled in (the proxy then registers without probing)."""
    _node_call(proxy, f"add {http.redact(url)}", timeout, lambda client: client.add_node(url, models), key)


def deregister(proxy: str, url: str, timeout: float = PROXY_TIMEOUT_S, key: str | None = None) -> None:
    """``POST /nodes/remove``."""
    _node_call(proxy, f"remove {http.redact(url)}", timeout, lambda client: client.remove_node(url), key)


# --- the commands' library functions -----------------------------------------------------------


def add_node(url: str, proxy: str, api_key: str | None = None, *,
             timeout: float = NODE_TIMEOUT_S) -> tuple[Node, bool]:
    """``launch proxy add``: register the node at ``url`` with the proxy at ``proxy``, only once
    its ``/health`` answers 200, with the model names its ``/v1/models`` lists (read with
    ``api_key``). Returns the node as the proxy lists it afterwards, and whether it was new.

    A server the proxy already has, under this or any other spelling (``same_node``), is not added
    again: a second entry would double its share, and re-adding it would reset the proxy's count of
    its requests in flight. Its entry is refreshed only when its models changed."""
    url = node_url(url)
    proxy = proxy_url(proxy)
    shown = http.redact(proxy)
    nodes = proxy_nodes(proxy, key=api_key)  # the proxy answers, before anything is asked of the node
    health = lmdeploy.check_health(url, timeout)
    if not health.ok:
        raise NodeNotHealthy(url, health.detail)
    models = node_models(url, api_key, timeout)
    known = same_node(url, nodes, timeout)
    if known is not None and tuple(nodes[known].models) == models:
        return nodes[known], False
    target = url if known is None else known
    register(proxy, target, models, key=api_key)
    node = proxy_nodes(proxy, key=api_key).get(target)
    if node is None or tuple(node.models) != models:
        raise ProxyRefused(shown, f"add {http.redact(target)}", "the node is not in its node list afterwards")
    return node, known is None


def remove_node(url: str, proxy: str, key: str | None = None) -> Node:
    """``launch proxy remove``: take the node at ``url`` (under whatever spelling the proxy has it,
    ``same_node``) out of the proxy. Refused (listing the proxy's nodes) when it is not one of them.
    ``key``: an API key of the router, for its node API."""
    url = node_url(url)
    proxy = proxy_url(proxy)
    nodes = proxy_nodes(proxy, key=key)
    known = url if url in nodes else same_node(url, nodes)
    if known is None:
        raise NodeNotRegistered(url, http.redact(proxy), tuple(http.redact(u) for u in nodes))
    deregister(proxy, known, key=key)
    if known in proxy_nodes(proxy, key=key):
        raise ProxyRefused(http.redact(proxy), f"remove {http.redact(known)}", "the node is still in its node list "
                           "afterwards")
    return nodes[known]


def advertise_url(host: str, port: int, advertise: str | None = None) -> str:
    """The URL a replica registers under: ``advertise`` (``--advertise-url``) normalised, else the
    address it listens on. A wildcard listen address needs ``advertise``: the proxy cannot reach
    ``0.0.0.0``, and which of this machine's addresses it can reach is not for launch to guess."""
    from launcher.runtime.address import is_wildcard

    if advertise:
        return node_url(advertise, "--advertise-url")
    if is_wildcard(host):
        raise BadOption("--advertise-url", "", f"the server listens on all interfaces ({host}); give the address "
                        "the proxy reaches it at, e.g. --advertise-url http://10.0.0.5:23333")
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return node_url(f"http://{shown}:{port}", "--host")


def leave(url: str, proxy: str, key: str | None = None) -> bool:
    """Take a stopping replica out of the proxy. ``False`` (never an error: a stop must not fail
    for it) when it was not registered or the proxy does not answer."""
    try:
        remove_node(url, proxy, key)
    except LaunchError:
        return False
    return True
