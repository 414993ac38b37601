"""launch's watchdog over lmdeploy's proxy: takes a dead or stuck node out within seconds and puts
it back when it answers again.

Why: lmdeploy 0.18's proxy drops a dead node only after its heartbeat expiry (90 s by default), and
meanwhile answers requests routed there with HTTP 200 and ``{"error_code": 10402, ...}``; its
heartbeat checks the nodes one after the other without a timeout, so one node whose ``/health``
hangs stops the check of all of them.

Each round (every ``interval_s``, on a fixed schedule) reads the proxy's node list, then checks
``/health`` of every node it knows at once, each within ``timeout_s``. A node that fails
``failures`` rounds in a row is removed through ``POST /nodes/remove``; the watchdog remembers its
models and adds it back (``POST /nodes/add`` with them) on the first round it answers 200. With the
defaults (2 s, 2 s, 2) a killed node is out within about 4 s and a hanging one within about 6 s.

A node that leaves the proxy's list without the watchdog removing it (``launch proxy remove``) is
forgotten, not added back. lmdeploy's node API takes any string from anyone; the proxy process
launch runs refuses at its door what the one node rule refuses (``proxy_server.node_problem``), and an
entry that is no http(s) URL found all the same (``not a url``, ``ftp://...``, port 99999) is taken
out at once and said once. While the node list cannot be read (the proxy answers ``/nodes/status``
with an error, or not at all), the nodes it already knows are still checked and a failing one taken
out (a removal needs no list); none is added back until the list reads again. One
server registered under several spellings (``http://h:p/``, ``127.1``, ``localhost``; see
``proxy.same_node``) is kept once. URLs are reported and recorded without ``user:password@``. ``on_change(removed)`` hears the list of nodes it holds out (when and
why each was taken out) when it starts and whenever that list changes: ``launch proxy start`` and
``serve --replicas`` keep it in a file for ``launch proxy status`` (``launcher.scaleout.state``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from launcher.engine.proxy_server import node_problem
from launcher.errors import LaunchError
from launcher.net.http import redact
from launcher.net.lmdeploy import Node, check_health_all
from launcher.scaleout.nodes import deregister, node_url, proxy_nodes, register, same_node
from launcher.scaleout.state import Removed

INTERVAL_S = 2.0
TIMEOUT_S = 2.0
FAILURES = 2


@dataclass
class _Member:
    models: tuple[str, ...]
    failures: int = 0
    removed: bool = False  # taken out by this watchdog, to be added back when healthy
    removed_at: float = 0.0  # when (time.time())
    reason: str = ""  # why: "/health connection refused (2 checks in a row)"


class Watchdog:
    """Keeps the proxy's node list to the nodes that answer ``/health``.

    ``report(line)`` gets one line per change (a node taken out or put back, the proxy not
    answering); it must not raise. ``step()`` runs one round (the tests call it directly);
    ``start()`` runs rounds in a daemon thread until ``stop()``."""

    def __init__(self, proxy: str, *, interval_s: float = INTERVAL_S, timeout_s: float = TIMEOUT_S,
                 failures: int = FAILURES, report: Callable[[str], None] = lambda line: None,
                 on_change: Callable[[list[Removed]], None] | None = None) -> None:
        if not (interval_s > 0 and timeout_s > 0 and failures >= 1):
            raise ValueError("interval_s and timeout_s must be > 0 and failures >= 1")
        self.proxy = proxy
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self.report = report
        self.on_change = on_change
        self._told: list[Removed] | None = None  # what on_change heard last
        self.members: dict[str, _Member] = {}
        self._proxy_down = False
        self._refused: set[str] = set()  # entries that are no URL, said once each
        self._addresses: dict[str, frozenset[str]] = {}  # what each node host stands for (same_node)
        self._stop = threading.Event()
        self._telling = threading.Lock()
        self._thread: threading.Thread | None = None

    def removed(self) -> list[Removed]:
        """The nodes this watchdog holds out of the proxy now, by URL."""
        return [Removed(redact(url), m.models, m.removed_at, m.reason) for url, m in sorted(self.members.items())
                if m.removed]

    def _tell(self) -> None:
        """``on_change`` with the held-out nodes, when they differ from what it heard last."""
        now = self.removed()
        with self._telling:  # once stop() returned nothing more is recorded: its owner clears the record
            if self.on_change is None or now == self._told or self._stop.is_set():
                return
            try:
                self.on_change(now)
            except (LaunchError, OSError) as err:
                self.report(f"watchdog: could not record the nodes it took out: {err}")
            self._told = now

    # -- one round ------------------------------------------------------------------------------
    def step(self) -> list[str]:
        """One round; returns the lines it reported."""
        try:
            return self._step()
        finally:
            self._tell()

    def _step(self) -> list[str]:
        lines: list[str] = []

        def say(line: str) -> None:
            lines.append(line)
            self.report(line)

        try:
            registered: dict[str, Node] | None = proxy_nodes(self.proxy, timeout=self.timeout_s)
        except LaunchError as err:
            if not self._proxy_down:
                say(f"watchdog: the proxy does not answer ({err}); retrying, and still taking out the nodes it "
                    "knows that fail /health")
            self._proxy_down = True
            registered = None
        else:
            if self._proxy_down:
                say("watchdog: the proxy answers again")
                self._proxy_down = False
        if registered is None:  # a removal needs no list: the nodes it knows are still checked
            self._check(None, say)
            return lines

        registered = self._normalise(registered, say)
        for url, node in registered.items():
            member = self.members.get(url)
            if member is None:
                self.members[url] = _Member(node.models)
            else:
                member.models, member.removed = node.models or member.models, False
        for url in [u for u, m in self.members.items() if not m.removed and u not in registered]:
            del self.members[url]  # removed by someone else: not ours to add back
        self._check(registered, say)
        return lines

    def _check(self, registered: dict[str, Node] | None, say: Callable[[str], None]) -> None:
        """Check ``/health`` of every node it knows; take out those failing ``failures`` rounds in a row
        and add back those it took out that answer. ``registered`` None: the node list could not be
        read; nothing is added back (whether it is registered again meanwhile cannot be told), and a
        removal that fails is not said (the proxy not answering was)."""
        health = check_health_all(list(self.members), self.timeout_s)
        for url, member in list(self.members.items()):
            result = health[url]
            if result.ok:
                member.failures = 0
                if member.removed and registered is not None:
                    twin = same_node(url, registered, self.timeout_s, self._addresses)
                    if twin is not None:  # registered again meanwhile, under another spelling: not twice
                        del self.members[url]
                        say(f"watchdog: {redact(url)} answers again and is registered as {redact(twin)}: not added "
                            "back twice")
                        continue
                    try:
                        register(self.proxy, url, member.models, timeout=self.timeout_s)
                    except LaunchError as err:
                        say(f"watchdog: {redact(url)} answers again but could not be added back: {err}")
                        continue
                    member.removed = False
                    say(f"watchdog: {redact(url)} answers /health again: added back ({', '.join(member.models)})")
                continue
            member.failures += 1
            if member.removed or member.failures < self.failures:
                continue
            try:
                deregister(self.proxy, url, timeout=self.timeout_s)
            except LaunchError as err:
                if registered is not None:
                    say(f"watchdog: could not take {redact(url)} out of the proxy: {err}")
                continue
            member.removed, member.removed_at = True, time.time()
            member.reason = f"/health {result.detail} ({member.failures} checks in a row)"
            say(f"watchdog: took {redact(url)} out of the proxy: {member.reason}; it is added back when it answers")

    def _normalise(self, registered: dict[str, Node], say: Callable[[str], None]) -> dict[str, Node]:
        """What lmdeploy's open node API let others register, made routable: an entry that is no
        http(s) URL is taken out (said once per entry); a server registered under several spellings
        is kept once (the spelling this watchdog already watches first, then ``node_url``'s), spelled
        as ``node_url`` spells it. lmdeploy would route to each entry as a node of its own."""
        out = dict(registered)
        for url in list(out):
            problem = node_problem(url)  # the door's rule: no entry it would refuse
            if problem is None:
                continue
            try:
                deregister(self.proxy, url, timeout=self.timeout_s)
            except LaunchError as err:
                say(f"watchdog: could not take {redact(url)!r} out of the proxy: {err}")
                continue
            del out[url]
            if url not in self._refused:
                self._refused.add(url)
                say(f"watchdog: took {redact(url)!r} out of the proxy: it is not a URL the proxy can reach ({problem})")
        kept: list[str] = []
        for url in sorted(out, key=lambda u: (u not in self.members, self._spelled(u) != u, u)):
            node = out[url]
            twin = same_node(url, kept, self.timeout_s, self._addresses)
            clean = self._spelled(url)
            try:
                if twin is None and clean != url and clean not in out:
                    register(self.proxy, clean, node.models, timeout=self.timeout_s)
                    out[clean] = Node(clean, node.models, node.unfinished)
                if twin is not None or clean != url:
                    deregister(self.proxy, url, timeout=self.timeout_s)
            except LaunchError as err:
                say(f"watchdog: could not replace {redact(url)} by {redact(twin or clean)}: {err}")
                kept.append(url)
                continue
            if twin is None and clean == url:
                kept.append(url)
                continue
            del out[url]
            if twin is None:
                kept.append(clean)
            say(f"watchdog: {redact(url)} is {redact(twin or clean)} spelled another way; kept it once, as "
                f"{redact(twin or clean)}")
        return out

    @staticmethod
    def _spelled(url: str) -> str:
        """``url`` as ``node_url`` spells it; ``url`` itself where ``node_url`` refuses it (0.0.0.0,
        credentials: reported by ``launch proxy status``, not guessed at)."""
        try:
            return node_url(url)
        except LaunchError:
            return url

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - the watchdog must outlive one bad round
                self.report(f"watchdog: round failed ({type(err).__name__}: {err}); continuing")
            next_round += self.interval_s
            now = time.monotonic()
            next_round = max(next_round, now)  # after a slow round, start the next one now
            self._stop.wait(next_round - now)

    def start(self) -> Watchdog:
        if self._thread is not None:
            raise RuntimeError("this watchdog was already started")
        self._tell()  # nothing held out yet: said at once
        self._thread = threading.Thread(target=self._run, name=f"watchdog {redact(self.proxy)}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the thread (waits for the round in progress: at most about ``2 x timeout_s``)."""
        with self._telling:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else 3 * self.timeout_s + 1.0)
