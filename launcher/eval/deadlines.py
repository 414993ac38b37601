"""A probe or ppl run's requests and their deadlines: a line while the first ones are unanswered,
and the stop when the engine keeps missing them (instead of waiting out every remaining request)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from launcher.errors import LaunchError
from launcher.net import http
from launcher.net.lmdeploy import Client

WAITING_NOTICE_S = 1.0  # a first request still unanswered after this is said on stderr
STUCK_AFTER = 3  # requests in a row past their deadline: the engine is stuck and the run stops


class EngineStuck(LaunchError):
    """Several requests in a row ran past their deadline: the run stops instead of waiting out
    every remaining one (hours at the defaults)."""

    url: str
    misses: int
    seconds: float
    exit_code = 3
    message = ("{url} left {misses} requests in a row unanswered within the {seconds:g} s deadline: the engine looks "
               "stuck, so the run stopped (the results so far are written). Restart the server, or give a longer "
               "--timeout if prompts this long need it.")


class StuckWatch:
    """Counts requests in a row that ran past their deadline; any answer (an error status too) resets it."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.misses = 0

    def after(self, error: LaunchError | None) -> EngineStuck | None:
        """Call after each trial or window with its error (None: answered); an ``EngineStuck`` to stop on."""
        self.misses = self.misses + 1 if isinstance(error, http.DeadlineExceeded) else 0
        if self.misses >= STUCK_AFTER:
            return EngineStuck(self.client.shown, self.misses, self.client.timeout)
        return None


@contextmanager
def waiting_notice(client: Client, say: Callable[[str], None]) -> Iterator[None]:
    """Around a run's first requests: ``say`` one line when they are still unanswered after
    ``WAITING_NOTICE_S``, so a server that accepts and says nothing still gets a line within a
    second (the deadline is ``client.timeout``); a quick refusal stays the one error line."""
    timer = threading.Timer(WAITING_NOTICE_S, lambda: say(
        f"waiting for {client.shown} (each request has a {client.timeout:g} s deadline) ..."))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
