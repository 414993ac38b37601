"""Where the server listens: the one rule for ``--host`` and ``--port``, the check that the port can be
bound before any weight is loaded, and the URLs a client on this machine uses to reach it.

Standard library only (plus launch's own HTTP client for one question about a busy port).
"""

from __future__ import annotations

import errno
import re
import socket

from .errors import BadOption, PortBusy

# What a server bound to a wildcard address is reached at from this machine.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: "²" or "٣" are digits to str.isdigit, not ports
_HOST_ADVICE = "use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)"


def validate_port(port: int | str) -> int:
    """``port`` as an int in 1..65535, or ``BadOption('--port', ...)``. Port 0 ("any free port") is
    refused because the printed URL would be wrong."""
    text = str(port).strip()
    if isinstance(port, bool) or not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise BadOption("--port", _shown(str(port)), "must be a whole number from 1 to 65535, e.g. --port 23333")
    return int(text)


def validate_host(host: str) -> str:
    """``host`` without IPv6 brackets: a name or address of printable ASCII (at most 253 characters,
    labels of at most 63); empty or blank is refused (say 0.0.0.0 for all interfaces)."""
    text = (host or "").strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if (not text or "/" in text or len(text) > 253 or not all(0x21 <= ord(ch) <= 0x7E for ch in text)
            or any(len(label) > 63 for label in text.split("."))):
        raise BadOption("--host", _shown(str(host)), f"is not an address; {_HOST_ADVICE}")
    return text


def _shown(value: str) -> str:
    """A flag value short enough for a one-line message (``BadOption`` shows it with ``repr``, which
    escapes control characters)."""
    return value if len(value) <= 80 else value[:79] + "…"


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to ``host``."""
    text = host.strip("[]").lower()
    return text in ("localhost", "::1") or text.startswith("127.")


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface (0.0.0.0, ::)."""
    return host.strip("[]") in _WILDCARD_HOSTS


def exposure_warning(host: str, has_keys: bool) -> str | None:
    """One line when a server on ``host`` is reachable from other machines without an API key."""
    if is_loopback(host) or has_keys:
        return None
    return (f"--host {host} lets other machines reach the server and no API key is set: anyone who can "
            "reach this port can use the model. Set LAUNCH_API_KEYS or --api-key-file, or use 127.0.0.1.")


def check_port_free(host: str, port: int | str) -> int:
    """Refuse a port the server could not bind, before any weight is loaded; return the port.

    Binds the way uvicorn's ``loop.create_server(host=..., port=...)`` does (every address the host
    resolves to, ``SO_REUSEADDR``, IPv6 sockets v6-only), then lets go. A port that merely has old
    connections in TIME_WAIT is free by that rule, as it is for uvicorn. Another process can still
    take the port while the weights load; then the server exits while starting and its log says so.
    """
    port = validate_port(port)
    host = validate_host(host)
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
        from .health import health_status

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
    return _WILDCARD_HOSTS.get(host.strip("[]"), host.strip("[]"))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_root_url(host: str, port: int) -> str:
    """``http://127.0.0.1:23333``: where the server answers, as seen from this machine."""
    return f"http://{_url_host(client_host(host))}:{port}"


def openai_base_url(host: str, port: int) -> str:
    """The OpenAI base URL clients are given: ``http://HOST:PORT/v1``."""
    return server_root_url(host, port) + "/v1"
