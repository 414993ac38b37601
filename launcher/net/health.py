"""Is the server up? ``/health`` and ``/v1/models`` of an OpenAI-compatible server, through launch's
one HTTP client (``launcher.net.http``: one deadline per request, loopback never proxied)."""

from __future__ import annotations

import time

from launcher.net import http

POLL_S = 0.25


def health_url_for(url: str) -> str:
    """``/health`` of the server at ``url``: its root, its ``/v1`` base URL, or the health URL."""
    url = url.rstrip("/")
    if url.endswith("/health"):
        return url
    return url.removesuffix("/v1") + "/health"


def health_status(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET url`` (a health URL), or ``None`` when nothing answers within ``timeout``
    (port closed, connection reset): that is how a server still loading its weights looks."""
    return http.status_of(url, timeout=timeout)


def wait_healthy(url: str, timeout: float, *, interval: float = POLL_S) -> bool:
    """Poll ``/health`` of the server at ``url`` (root, ``/v1`` base or health URL) until it answers
    200; ``True`` then, ``False`` once ``timeout`` seconds have passed. For the smoke test and probes;
    the supervisor also watches the process while it waits."""
    health = health_url_for(url)
    deadline = time.monotonic() + timeout
    while True:
        if health_status(health, timeout=max(0.1, min(2.0, deadline - time.monotonic()))) == 200:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def served_models(root_url: str, api_key: str | None = None, timeout: float = 5.0) -> list[str]:
    """Model ids from ``GET /v1/models`` (empty if it does not answer as expected)."""
    try:
        return list(http.list_models(root_url, api_key=api_key, timeout=timeout)[1] or ())
    except (http.Unreachable, http.DeadlineExceeded):
        return []
