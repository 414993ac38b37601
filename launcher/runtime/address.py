"""Where the server listens: the one rule for ``--host`` and ``--port``, the check that the port can be
bound before any weight is loaded, and the URLs a client on this machine uses to reach it.

Standard library only (plus launch's own HTTP client for one question about a busy port).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterable
from typing import TextIO

from launcher.rules.checks import BadOption
from launcher.runtime.ports import PortBusy

_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: "²" or "٣" are digits to str.isdigit, not ports
_HOST_ADVICE = "use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)"
# What the C library may read as an IPv4 literal: 1 to 4 numbers (decimal, 0x hex, 0 octal) joined by dots
_NUMERIC_V4 = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}", re.ASCII)
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)", re.ASCII)


def validate_port(port: int | str) -> int:
    """``port`` as an int in 1..65535, or ``BadOption('--port', ...)``. Port 0 ("any free port") is
    refused because the printed URL would be wrong."""
    text = str(port).strip()
    if isinstance(port, bool) or not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise BadOption("--port", _shown(str(port)), "must be a whole number from 1 to 65535, e.g. --port 23333")
    return int(text)


def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` names as a numeric literal, read the way the C library reads it when a
    server binds or a client connects (``getaddrinfo`` with ``AI_NUMERICHOST``: ``127.1``,
    ``2130706433``, ``0x7f.0.0.1`` and ``0177.0.0.1`` are all 127.0.0.1); an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.1``) is its IPv4 address. ``None`` when ``text`` is not a numeric literal."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            return None
        return address.ipv4_mapped or address
    if not text or not text.isascii() or not _NUMERIC_V4.fullmatch(text):
        return None
    try:
        infos = socket.getaddrinfo(text, None, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return ipaddress.IPv4Address(infos[0][4][0])


def canonical_host(host: str) -> str:
    """One spelling per host: an IP literal in its standard form (``127.1`` and ``[::ffff:127.0.0.1]``
    are ``127.0.0.1``; IPv6 compressed, without brackets), a name in lower case without a trailing
    dot. Assumes ``check_host`` accepted it."""
    address = ip_literal(host)
    if address is not None:
        return str(address)
    return host.strip().strip("[]").rstrip(".").lower()


def check_host(host: str, option: str = "--host", advice: str = _HOST_ADVICE) -> str:
    """The one rule for a host value (``--host``, the host of a node or proxy URL, of
    ``--dist-init-addr``): an IP literal (any spelling the C library reads, see ``ip_literal``) or a
    host name (labels of letters, digits, ``-`` and ``_``, 1 to 63 characters, not starting or ending
    with ``-``; at most 253 in all; its last label not all digits, so ``256.1.1.1`` is no name and no
    address). Returns it in its canonical spelling (``canonical_host``); ``BadOption(option, ...)``
    ending with ``advice``."""
    raw = "" if host is None else str(host)
    text = raw.strip()
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
        if ":" not in text:  # brackets hold an IPv6 address, nothing else
            raise BadOption(option, _shown(raw), f"is not an IPv6 address; {advice}")
    if ip_literal(text) is not None:
        return canonical_host(text)
    if not text:
        raise BadOption(option, _shown(raw), f"is empty; {advice}")
    if ":" in text:
        port_given = text.count(":") == 1 and not bracketed
        raise BadOption(option, _shown(raw), ("is not an address: give the host alone (the port has a place of its "
                                              f"own); {advice}") if port_given else f"is not an IPv6 address; {advice}")
    name = text.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadOption(option, _shown(raw), f"is not a host name or an IP address; {advice}")
    if _NUMERIC_V4.fullmatch(name) or labels[-1].isdigit():
        raise BadOption(option, _shown(raw), "is not an IP address (an IPv4 address is four numbers from 0 to "
                        f"255, e.g. 10.0.0.5); {advice}")
    return canonical_host(text)


def host_addresses(hosts: Iterable[str], timeout: float = 2.0) -> dict[str, frozenset[str]]:
    """The addresses each host stands for, to tell whether two spellings name one machine: an IP
    literal is itself (``canonical_host``); a name is what ``getaddrinfo`` resolves it to, the lookups
    run at once and all end within ``timeout`` seconds; a name that does not resolve in time stands
    only for itself (lower case)."""
    hosts = list(dict.fromkeys(hosts))
    out = {host: frozenset({canonical_host(host)}) for host in hosts}

    def lookup(host: str) -> None:
        try:
            infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        found = {str(ip_literal(info[4][0]) or info[4][0]) for info in infos}
        if found:
            out[host] = frozenset(found)  # each thread writes its own key

    threads = [threading.Thread(target=lookup, args=(host,), daemon=True, name="resolve")
               for host in hosts if ip_literal(host) is None]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(out)


def validate_host(host: str) -> str:
    """``--host``: ``check_host``, in its canonical spelling (no IPv6 brackets)."""
    return check_host(host, "--host")


def _shown(value: str) -> str:
    """A flag value short enough for a one-line message (``BadOption`` shows it with ``repr``, which
    escapes control characters)."""
    return value if len(value) <= 80 else value[:79] + "…"


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to ``host``: a loopback address however
    it is spelled, or ``localhost`` (RFC 6761: always loopback). Any other name may resolve to
    anything, so it counts as reachable from other machines."""
    address = ip_literal(host)
    if address is not None:
        return address.is_loopback
    name = host.strip().strip("[]").rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface (0.0.0.0, ::, however spelled; or empty)."""
    if not host.strip().strip("[]"):
        return True
    address = ip_literal(host)
    return address is not None and address.is_unspecified


def exposure_warnings(host: str, port: int | str, has_keys: bool, *, node_api: bool = False) -> list[str]:
    """The one rule for warning about a bind beyond loopback, used by ``serve`` (its dry run and
    ``--replicas`` too) and ``proxy start``: a line when the OpenAI API on ``host`` is open to other
    machines without an API key, and with ``node_api`` (lmdeploy's proxy) a line about its node
    API, which takes no key whatever keys are set. Empty on loopback."""
    if is_loopback(host):
        return []
    lines = []
    if not has_keys:
        lines.append(f"--host {host} lets other machines reach the OpenAI API on port {port} and no API key is set: "
                     "anyone who can reach it can use the model. Set LAUNCH_API_KEYS or --api-key-file, or use "
                     "127.0.0.1.")
    if node_api:
        lines.append(f"--host {host} lets other machines reach the proxy's node API on port {port} (/nodes/add, "
                     "/nodes/remove), which takes no API key (lmdeploy's rule): whoever reaches it can change the "
                     "nodes. Keep it on a private network.")
    return lines


def say_warnings(lines: Iterable[str], stream: TextIO) -> None:
    """``warning: LINE`` on ``stream`` (stderr) for each line: how serve and proxy start print them."""
    for line in lines:
        print(f"warning: {line}", file=stream, flush=True)


def check_port_free(host: str, port: int | str) -> int:
    """Refuse a port the server could not bind, before any weight is loaded; return the port.

    Binds the way uvicorn's ``loop.create_server(host=..., port=...)`` does (every address the host
    resolves to, ``SO_REUSEADDR``, IPv6 sockets v6-only), then lets go. A port that merely has old
    connections in TIME_WAIT is free by that rule, as it is for uvicorn. Another process can still
    take the port while the weights load; then the server exits while starting and its log says so.
    """
    port = validate_port(port)
    return port_free(validate_host(host), port)


def port_free(host: str, port: int) -> int:
    """``check_port_free`` for a host and port checked already (``validate_host``, the port's
    limit): the bind test alone, for a caller whose values were checked where they entered."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadOption("--host", host, f"cannot be resolved ({exc.strerror}); use an address such as "
                        "127.0.0.1") from None
    except UnicodeError:  # the IDNA codec refuses the name
        raise BadOption("--host", _shown(host), f"is not an address; {_HOST_ADVICE}") from None
    held: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, type_, proto)
            except OSError:
                continue  # an address family this machine lacks; uvicorn skips it too
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise _bind_error(host, port, exc) from None
    finally:
        for sock in held:
            sock.close()
    return port


def _bind_error(host: str, port: int, exc: OSError) -> Exception:
    if exc.errno == errno.EADDRINUSE:
        from launcher.net.lmdeploy import health_status

        status = health_status(server_root_url(host, port) + "/health", timeout=1.0)
        who = ("a server that answers /health listens there; is another `launch serve` running?"
               if status is not None else "another program listens there")
        return PortBusy(host, port, who)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return BadOption("--port", str(port), "needs root to listen on (ports below 1024 are privileged); "
                         "pick a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return BadOption("--host", host, f"is not an address of this machine; {_HOST_ADVICE}")
    return BadOption("--port", str(port), f"cannot listen on {host}:{port} ({exc.strerror or exc})")


def free_ports(n: int = 1, host: str = "127.0.0.1") -> int:
    """A port p with p .. p+n-1 all free on ``host`` right now (another program may still take them
    later), for ``make smoke`` and the tests, which start servers on ports of their own. ``OSError``
    when 200 tries find no such run."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            first = probe.getsockname()[1]
        if first + n - 1 > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(first, first + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise OSError(f"no {n} free ports in a row on {host}")


def client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server listening on ``host``."""
    if is_wildcard(host):
        return "::1" if ":" in host else "127.0.0.1"
    return host.strip().strip("[]")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_root_url(host: str, port: int) -> str:
    """``http://127.0.0.1:23333``: where the server answers, as seen from this machine."""
    return f"http://{_url_host(client_host(host))}:{port}"


def openai_base_url(host: str, port: int) -> str:
    """The OpenAI base URL clients are given: ``http://HOST:PORT/v1``."""
    return server_root_url(host, port) + "/v1"
