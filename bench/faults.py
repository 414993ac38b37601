"""Routers in front of 3 replicas under a fault schedule, side by side in one run (issue 19).

    python bench/faults.py [--requests N] [--stream-requests M] [--concurrency C] [--routers a,b,...]
                           [--deadline S] [--fixed-targets] [--json OUT]

The replicas are tests/support/standin_openai.py (lmdeploy's api_server's endpoints and JSON; each chat
takes REPLY seconds, drawn per request) on free loopback ports. For each router, and for each pass
(N chat requests, then M streaming ones), with C requests in flight all along:

1. three fresh replicas and a fresh router (its start time: spawn until its ready URL answers 200);
   the replicas registered as the router's table says; a few warm-up requests;
2. the requests, each with a deadline of S seconds; when N/3 have completed the replica with the
   most chats in flight is SIGKILLed, at 2N/3 the busiest one left is SIGSTOPped (SIGCONTed when the
   pass is over). The busiest, not a fixed one: a router that sends everything to one replica must
   not look safe because the faults hit the idle ones (``--fixed-targets``: replicas 1 and 2);
3. a request failed if it did not come back 200 with a complete answer in time: another status, an
   error body (lmdeploy's proxy answers 200 ``{"error_code": 10402, ...}``), a stream without its
   ``[DONE]``, a broken connection, the deadline;
4. the requests in flight on each failed replica at the moment it failed, from the replicas' own log
   (``--log-chats``: a start and an end line per chat with its prompt, which names the request, on the
   machine's monotonic clock); for the stopped one also those in transit (sent before the stop, read
   after its SIGCONT). The goal (issue 19): no more failures than those. "Avoidable": the failed
   requests that were none of them (sent to a replica that had already failed, or lost by the router);
5. the router's peak RSS (its whole process tree, sampled every 0.2 s) over both passes, and the
   share of the busiest replica before the first fault (does it spread the load at all).

Latency added by a router: the same N requests sent straight to one healthy replica (same C, no
faults, the same run) are the baseline; p50 and p99 of the router's successful requests (fault pass)
minus the baseline's.

A router is one row of ROUTERS: how to start it, how its replicas are registered (at start on its
command line, or by an HTTP call once it is ready), the URL that says it is ready, and placeholder
workers it must start with. Rows that need something this checkout lacks say why and are skipped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STANDIN = ROOT / "tests" / "support" / "standin_openai.py"
MODEL = "standin-model"
REPLY = "0.05-0.1"  # seconds per chat on a replica, drawn per request
REPLICAS = 3
WARMUP = 12
FIXED_TARGETS = (1, 2)  # --fixed-targets: replica 1 is SIGKILLed at 1/3 of a pass, replica 2 SIGSTOPped at 2/3
START_TIMEOUT_S = 120.0
# A request's deadline. Requests in flight on the stopped replica are held until it, so each pass lasts
# at least this long; no router here gives up sooner on its own (vllm-router: 1,800 s, lmdeploy's
# proxy: never), so a longer one changes only the time (checked at 30 s: same counts).
DEADLINE_S = 10.0

# vllm-router's health checks and circuit breaker, tuned (its defaults check every 60 s: a stuck
# replica stays in rotation ~3 min); see ../shared/design/scale-out.md, "Two Rust routers".
VLLM_TUNED = ("--health-check-interval-secs", "2", "--health-check-timeout-secs", "2",
              "--health-failure-threshold", "2", "--health-success-threshold", "1",
              "--cb-failure-threshold", "3", "--cb-success-threshold", "1",
              "--cb-timeout-duration-secs", "5", "--cb-window-duration-secs", "10")


# -- the routers --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    router: int
    extra: int  # a second free port, for a router that opens one more (vllm-router's Prometheus)


def http_call(method: str, url: str, body: object = None, timeout: float = 60.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def nodes_add(root: str, url: str) -> None:
    """lmdeploy's node API (``launch proxy start`` keeps it): registered with its models, not probed."""
    status, body = http_call("POST", root + "/nodes/add", {"url": url, "status": {"models": [MODEL]}})
    if status != 200:
        raise RuntimeError(f"POST {root}/nodes/add {url}: HTTP {status} {body[:200]!r}")


def add_worker(root: str, url: str) -> None:
    """vllm-router's admin API (blocks until the worker's /health answers)."""
    status, body = http_call("POST", f"{root}/add_worker?url={urllib.parse.quote(url, safe='')}")
    if status != 200:
        raise RuntimeError(f"POST {root}/add_worker {url}: HTTP {status} {body[:200]!r}")


def remove_worker(root: str, url: str) -> None:
    status, body = http_call("POST", f"{root}/remove_worker?url={urllib.parse.quote(url, safe='')}")
    if status != 200:
        raise RuntimeError(f"POST {root}/remove_worker {url}: HTTP {status} {body[:200]!r}")


@cache
def launch_has_router_flag() -> bool:
    """Whether ``launch proxy start`` chooses its router (``--router``)."""
    result = subprocess.run([sys.executable, "-m", "launcher", "proxy", "start", "--help"], capture_output=True,
                            text=True, check=False, cwd=ROOT)
    return "--router" in result.stdout


def launch_proxy(*flags: str) -> Callable[[Ports, Sequence[str]], list[str]]:
    def argv(ports: Ports, _workers: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "launcher", "proxy", "start", "--port", str(ports.router), *flags]
    return argv


def legacy_lmdeploy(ports: Ports, workers: Sequence[str]) -> list[str]:
    """lmdeploy's proxy through ``launch proxy start``, whatever launch's default router is."""
    return launch_proxy(*(("--router", "lmdeploy") if launch_has_router_flag() else ()))(ports, workers)


def vllm_router(policy: str, workers_at_start: bool) -> Callable[[Ports, Sequence[str]], list[str]]:
    def argv(ports: Ports, workers: Sequence[str]) -> list[str]:
        return [str(VENV_BIN / "vllm-router"), "--host", "127.0.0.1", "--port", str(ports.router),
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(ports.extra), "--policy", policy,
                *VLLM_TUNED, *(("--worker-urls", *workers) if workers_at_start else ())]
    return argv


def needs_router_flag() -> str | None:
    return None if launch_has_router_flag() else "`launch proxy start --help` shows no --router yet"


def needs_vllm_router() -> str | None:
    return None if (VENV_BIN / "vllm-router").exists() else f"no {VENV_BIN / 'vllm-router'}"


@dataclass(frozen=True)
class Router:
    """``argv(ports, worker_urls)`` starts it; it is ready when GET ``ready`` answers 200; then
    ``register(root, url)`` adds each replica (None: they were on its command line).
    ``placeholders``: that many stand-ins that answer only ``/health`` are its command line's workers
    instead (vllm-router's power_of_two will not start with fewer than 2, and waits until they are
    healthy), removed with ``unregister(root, url)`` once it is ready, before the replicas are added.
    ``missing()``: why it cannot run here, or None."""

    argv: Callable[[Ports, Sequence[str]], list[str]]
    ready: str
    register: Callable[[str, str], None] | None
    missing: Callable[[], str | None] = lambda: None
    note: str = ""
    placeholders: int = 0
    unregister: Callable[[str, str], None] | None = None


ROUTERS: dict[str, Router] = {
    "lmdeploy": Router(legacy_lmdeploy, "/nodes/status", nodes_add,
                       note="lmdeploy's proxy + launch's watchdog (`launch proxy start`)"),
    "launch-default": Router(launch_proxy(), "/nodes/status", nodes_add, needs_router_flag,
                             note="`launch proxy start`, its default router"),
    "launch-lmdeploy": Router(launch_proxy("--router", "lmdeploy"), "/nodes/status", nodes_add, needs_router_flag,
                              note="`launch proxy start --router lmdeploy`"),
    "vllm-sticky": Router(vllm_router("sticky_least_loaded", False), "/liveness", add_worker, needs_vllm_router,
                          note="vllm-router sticky_least_loaded, tuned, workers added after start"),
    "vllm-p2": Router(vllm_router("power_of_two", True), "/liveness", None, needs_vllm_router,
                      note="vllm-router power_of_two, tuned, workers on its command line"),
    "vllm-p2-late": Router(vllm_router("power_of_two", True), "/liveness", add_worker, needs_vllm_router,
                           note="vllm-router power_of_two, tuned, started on 2 placeholders, workers added after",
                           placeholders=2, unregister=remove_worker),
    "vllm-rr": Router(vllm_router("round_robin", False), "/liveness", add_worker, needs_vllm_router,
                      note="vllm-router round_robin, tuned, workers added after start"),
}


def default_routers() -> list[str]:
    """What launch ships (its default and its lmdeploy choice) and the raw vllm-router policies."""
    launch = ["launch-default", "launch-lmdeploy"] if launch_has_router_flag() else ["lmdeploy"]
    return [*launch, "vllm-sticky", "vllm-p2", "vllm-p2-late", "vllm-rr"]


# -- processes ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child in a process group of its own, its output in ``log``. ``stop()`` ends it and every
    process it started (those ``tree()`` saw, and its group), nothing else."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=ROOT, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[psutil.Process]:
        try:
            top = psutil.Process(self.pid)
            found = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in found:
            self.seen.setdefault(p.pid, p)
        return found

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 20.0) -> None:
        self.tree()
        for signum in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for p in self.seen.values():  # children in groups of their own (launch's proxy server)
            try:
                if p.is_running():  # same pid and start time: still the one seen
                    p.wait(grace_s)
            except psutil.TimeoutExpired:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_http(url: str, timeout_s: float, process: Process | None = None) -> float:
    """Seconds until GET ``url`` answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process is not None and process.proc.poll() is not None:
            raise RuntimeError(f"exited with {process.proc.returncode} before {url} answered:\n{process.tail()}")
        try:
            if http_call("GET", url, timeout=2.0)[0] == 200:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s" + (f":\n{process.tail()}" if process else ""))


@dataclass
class Chat:
    """One chat as a replica logged it: when it started and ended (inf: never), and its prompt."""

    start: float
    end: float
    prompt: str

    @property
    def request(self) -> int | None:
        """The number of the measured request it was (``chat_body``), None for a warm-up."""
        head, _, _ = self.prompt.partition(":")
        return int(head[len("request "):]) if head.startswith("request ") and head[8:].isdigit() else None


@contextmanager
def placeholders(count: int) -> Iterator[list[str]]:
    """``count`` HTTP servers on free loopback ports that answer ``GET /health`` with 200 and
    anything else with 404, while the block runs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support.servers import JSONHandler, serving, url_of

    class Health(JSONHandler):
        def do_GET(self) -> None:
            self.send_json(*((200, {"status": "healthy"}) if self.path == "/health" else (404, {})))

        do_POST = do_GET

    with ExitStack() as stack:
        yield [url_of(stack.enter_context(serving(Health))) for _ in range(count)]


class Replicas:
    """``count`` stand-in replicas on free loopback ports, each logging its chats."""

    def __init__(self, work: Path, count: int = REPLICAS) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.procs = [Process([sys.executable, str(STANDIN), "--port", str(port), "--model-name", MODEL,
                               "--reply-seconds", REPLY, "--log-chats"], work / f"replica-{i}-{port}.log")
                      for i, port in enumerate(self.ports)]
        try:
            for url, proc in zip(self.urls, self.procs):
                wait_http(url + "/health", 30.0, proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop(5.0)

    def chats(self, index: int) -> list[Chat]:
        """Replica ``index``'s chats so far, from its ``--log-chats`` lines."""
        chats: dict[str, Chat] = {}
        text = self.procs[index].log.read_text(errors="replace")
        for line in text[:text.rfind("\n") + 1].splitlines():  # not a line still being written
            parts = line.split(" ", 5)
            if parts[:3] == ["standin:", "chat", "start"] and len(parts) == 6:
                chats[parts[3]] = Chat(float(parts[4]), math.inf, json.loads(parts[5]))
            elif parts[:3] == ["standin:", "chat", "end"] and len(parts) == 5 and parts[3] in chats:
                chats[parts[3]].end = float(parts[4])
        return list(chats.values())

    def in_flight(self, index: int, at: float) -> list[Chat]:
        """Chats replica ``index`` had started by ``at`` (time.monotonic()) and not finished by then."""
        return [c for c in self.chats(index) if c.start <= at < c.end]

    def busiest(self, among: Sequence[int]) -> int:
        """The replica of ``among`` with the most chats in flight now (then the most chats so far)."""
        now = time.monotonic()
        return max(among, key=lambda i: (len(self.in_flight(i, now)), len(self.chats(i)), -i))

    def counts(self) -> list[int]:
        return [len(self.chats(i)) for i in range(len(self.procs))]


class RSS:
    """The peak resident memory of a process tree, sampled every ``interval_s`` in a thread."""

    def __init__(self, process: Process, interval_s: float = 0.2) -> None:
        self.process, self.interval_s, self.peak = process, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        total = 0
        for p in self.process.tree():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# -- the load -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    request: int
    start: float
    end: float
    error: str | None  # None: a complete answer

    @property
    def seconds(self) -> float:
        return self.end - self.start


def chat_body(i: int, stream: bool) -> bytes:
    """Request ``i`` (its number in its prompt, so the replicas' logs tell which it was; -1: a warm-up)."""
    prompt = f"request {i}: say something" if i >= 0 else "warm-up: say something"
    return json.dumps({"model": MODEL, "stream": stream, "max_tokens": 16,
                       "messages": [{"role": "user", "content": prompt}]}).encode()


class Client:
    """One keep-alive connection per load thread (as an OpenAI client's pool has), reopened after an
    error; each request has an overall deadline."""

    def __init__(self, root: str, deadline_s: float) -> None:
        parsed = urllib.parse.urlsplit(root)
        self.host, self.port, self.deadline_s = parsed.hostname, parsed.port, deadline_s
        self.conn: http.client.HTTPConnection | None = None

    def send(self, i: int, stream: bool) -> Outcome:
        start = time.monotonic()
        deadline = start + self.deadline_s
        try:
            error = self._send(chat_body(i, stream), stream, deadline)
        except TimeoutError:
            error = "timeout"
        except (OSError, http.client.HTTPException) as e:
            error = f"connection: {type(e).__name__}"
        if error is not None and self.conn is not None:
            self.conn.close()
            self.conn = None
        end = time.monotonic()
        return Outcome(i, start, end, "timeout" if error is not None and end >= deadline else error)

    def _send(self, body: bytes, stream: bool, deadline: float) -> str | None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.deadline_s)
        self.conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        if self.conn.sock is not None:
            self.conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        reply = self.conn.getresponse()
        if not stream:
            data = reply.read()
            if reply.status != 200:
                return f"HTTP {reply.status}"
            try:
                answer = json.loads(data)
            except ValueError:
                return "not JSON"
            if not isinstance(answer, dict) or not answer.get("choices"):
                return "error body" + (f" {answer.get('error_code')}" if isinstance(answer, dict) else "")
            return None
        if reply.status != 200:
            reply.read()
            return f"HTTP {reply.status}"
        chunks = 0
        while True:
            if self.conn.sock is not None:
                self.conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            line = reply.readline()
            if time.monotonic() >= deadline:
                raise TimeoutError
            if not line:
                return "stream cut" if chunks else "empty stream"
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                reply.read()
                return None
            try:
                chunk = json.loads(data)
            except ValueError:
                return "stream: not JSON"
            if not isinstance(chunk, dict) or "choices" not in chunk:
                return "stream: error chunk"
            chunks += 1


def load(root: str, requests: int, concurrency: int, stream: bool, deadline_s: float,
         at_done: dict[int, Callable[[], None]] | None = None, warmup: bool = False) -> list[Outcome]:
    """``requests`` chats with ``concurrency`` in flight; ``at_done[k]()`` runs once k have completed, in a
    thread of its own: not in a load thread, whose next request would go out at the very moment of
    the fault, every time (a coincidence the schedule would make, not the routers)."""
    lock = threading.Condition()
    counter = iter(range(requests))
    outcomes: list[Outcome] = []
    over = threading.Event()

    def worker() -> None:
        client = Client(root, deadline_s)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            outcome = client.send(-1 if warmup else i, stream)
            with lock:
                outcomes.append(outcome)
                lock.notify_all()
        if client.conn is not None:
            client.conn.close()

    def scheduler() -> None:
        for k, action in sorted((at_done or {}).items()):
            with lock:
                lock.wait_for(lambda k=k: len(outcomes) >= k or over.is_set())
                if len(outcomes) < k:
                    return
            action()

    timeline = threading.Thread(target=scheduler, daemon=True)
    timeline.start()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
    finally:
        with lock:
            over.set()
            lock.notify_all()
        timeline.join()
    return outcomes


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summary(outcomes: Sequence[Outcome]) -> dict:
    ok = [o.seconds for o in outcomes if o.error is None]
    kinds: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            kinds[o.error] = kinds.get(o.error, 0) + 1
    return {"requests": len(outcomes), "failed": len(outcomes) - len(ok), "failures": kinds,
            "p50_ms": percentile(ok, 0.5) * 1000, "p99_ms": percentile(ok, 0.99) * 1000}


def account(replicas: Replicas, faults: dict[str, tuple[int, float]], outcomes: Sequence[Outcome]) -> dict:
    """Which requests were in flight on each failed replica when it failed (started there and not
    finished; for the stopped one also those in transit: sent by the client before the stop, read by
    the replica only after its SIGCONT), and which failed requests were none of them ("avoidable":
    the router sent them to a replica that had already failed, or lost them itself). The goal: no
    more failures than requests in flight on the failed replicas."""
    sent_at = {o.request: o.start for o in outcomes}
    held: dict[str, set[int]] = {}
    in_transit = 0
    for label, (index, at) in faults.items():
        chats = [c for c in replicas.chats(index) if c.request is not None]
        held[label] = {c.request for c in chats if c.start <= at < c.end}
        if label == "stopped":
            late = {c.request for c in chats if c.start > at and sent_at.get(c.request, math.inf) < at}
            in_transit = len(late - held[label])
            held[label] |= late
    in_flight = set().union(*held.values()) if held else set()
    failed = {o.request for o in outcomes if o.error is not None}
    times = {label: at for label, (_, at) in faults.items()}
    unexplained = [{"request": o.request, "error": o.error, "sent_s_after": {k: round(o.start - at, 3) for k, at in
                                                                            times.items()}}
                   for o in outcomes if o.error is not None and o.request not in in_flight]
    measured = [[c for c in replicas.chats(i) if c.request is not None] for i in range(len(replicas.procs))]
    first = min((at for _, at in faults.values()), default=math.inf)
    early = [sum(1 for c in chats if c.start < first) for chats in measured]
    return {"failed_replicas": {label: index for label, (index, _) in faults.items()},
            "in_flight": {label: len(ids) for label, ids in held.items()}, "in_transit_to_stopped": in_transit,
            "in_flight_total": len(in_flight), "avoidable": len(failed - in_flight), "avoidable_requests": unexplained,
            "chats_per_replica": [len(chats) for chats in measured],
            "top_share_before_faults": max(early) / max(1, sum(early)), "goal_met": len(failed) <= len(in_flight)}


# -- one router ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    requests: int = 600
    stream_requests: int = 300
    concurrency: int = 12
    deadline_s: float = DEADLINE_S
    routers: list[str] = field(default_factory=list)
    json_out: Path | None = None
    fixed_targets: bool = False


def fault_pass(name: str, router: Router, work: Path, settings: Settings, stream: bool, env: dict,
               peak: list[int]) -> dict:
    """Fresh replicas and a fresh ``router``; ``requests`` chats with the faults at 1/3 and 2/3."""
    requests = settings.stream_requests if stream else settings.requests
    tag = f"{name}-{'stream' if stream else 'plain'}"
    (work / tag).mkdir(parents=True)
    replicas = Replicas(work / tag)
    ports = Ports(free_port(), free_port())
    root = f"http://127.0.0.1:{ports.router}"
    process = None
    rss = None
    try:
        with placeholders(router.placeholders) as stand_ins:
            began = time.monotonic()
            process = Process(router.argv(ports, stand_ins or replicas.urls), work / tag / "router.log", env)
            rss = RSS(process)
            start_s = wait_http(root + router.ready, START_TIMEOUT_S, process)
            if router.unregister is not None:
                for url in stand_ins:
                    router.unregister(root, url)
        if router.register is not None:
            for url in replicas.urls:
                router.register(root, url)
        register_s = time.monotonic() - began - start_s
        load(root, WARMUP, min(settings.concurrency, WARMUP), stream, settings.deadline_s, warmup=True)
        faults: dict[str, tuple[int, float]] = {}  # "killed" / "stopped": which replica, when

        def fail(order: int, signum: int, label: str) -> Callable[[], None]:
            def act() -> None:
                alive = [i for i in range(REPLICAS) if i not in {index for index, _ in faults.values()}]
                index = FIXED_TARGETS[order] if settings.fixed_targets else replicas.busiest(alive)
                faults[label] = (index, time.monotonic())
                replicas.procs[index].signal(signum)
            return act

        began = time.monotonic()
        outcomes = load(root, requests, settings.concurrency, stream, settings.deadline_s,
                        {requests // 3: fail(0, signal.SIGKILL, "killed"),
                         2 * requests // 3: fail(1, signal.SIGSTOP, "stopped")})
        wall_s = time.monotonic() - began
        rss.sample()
        if "stopped" in faults:
            replicas.procs[faults["stopped"][0]].signal(signal.SIGCONT)
            time.sleep(0.5)  # it reads (and logs) what was queued for it while it was stopped
        result = summary(outcomes)
        result.update(account(replicas, faults, outcomes), wall_s=wall_s, start_s=start_s, register_s=register_s)
        return result
    finally:
        if rss is not None:
            peak.append(rss.stop())
        if process is not None:
            process.stop()
        replicas.stop()


def baseline(work: Path, settings: Settings) -> dict:
    """The same requests straight to one healthy replica: what a router's latency is compared with."""
    (work / "direct").mkdir(parents=True)
    replica = Replicas(work / "direct", count=1)
    try:
        load(replica.urls[0], WARMUP, min(settings.concurrency, WARMUP), False, settings.deadline_s, warmup=True)
        outcomes = load(replica.urls[0], settings.requests, settings.concurrency, False, settings.deadline_s)
    finally:
        replica.stop()
    return summary(outcomes)


def bench_router(name: str, work: Path, settings: Settings, direct: dict) -> dict:
    router = ROUTERS[name]
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(work / "launch-cache"), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    peak: list[int] = []
    plain = fault_pass(name, router, work, settings, False, env, peak)
    streamed = fault_pass(name, router, work, settings, True, env, peak)
    plain["added_p50_ms"] = plain["p50_ms"] - direct["p50_ms"]
    plain["added_p99_ms"] = plain["p99_ms"] - direct["p99_ms"]
    return {"router": name, "note": router.note, "plain": plain, "stream": streamed,
            "peak_rss_mib": max(peak) / 2**20, "start_s": statistics.median([plain["start_s"], streamed["start_s"]])}


def schedule(settings: Settings) -> str:
    if settings.fixed_targets:
        return f"replica {FIXED_TARGETS[0]} SIGKILL at 1/3, replica {FIXED_TARGETS[1]} SIGSTOP at 2/3"
    return "the busiest replica SIGKILLed at 1/3, the busiest one left SIGSTOPped at 2/3"


def run(settings: Settings, say: Callable[[str], None] = print) -> dict:
    names = settings.routers or default_routers()
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise SystemExit(f"faults: unknown router(s) {', '.join(unknown)}; known: {', '.join(ROUTERS)}")
    work = Path(tempfile.mkdtemp(prefix="launch-bench-faults-"))
    results: dict = {"requests": settings.requests, "stream_requests": settings.stream_requests,
                     "concurrency": settings.concurrency, "deadline_s": settings.deadline_s, "reply_s": REPLY,
                     "replicas": REPLICAS, "schedule": schedule(settings),
                     "routers": [], "skipped": {}}
    try:
        direct = baseline(work, settings)
        results["direct"] = direct
        say(f"faults: direct to one replica: p50 {direct['p50_ms']:.1f} ms, p99 {direct['p99_ms']:.1f} ms, "
            f"{direct['failed']} failed of {direct['requests']}")
        for name in names:
            why = ROUTERS[name].missing()
            if why:
                results["skipped"][name] = why
                say(f"faults: {name} skipped: {why}")
                continue
            began = time.monotonic()
            row = bench_router(name, work, settings, direct)
            row["bench_s"] = time.monotonic() - began
            results["routers"].append(row)
            say(f"faults: {name}: {row['plain']['failed']} + {row['stream']['failed']} (streaming) failed, "
                f"{row['plain']['in_flight_total']} + {row['stream']['in_flight_total']} in flight on failed "
                f"replicas, {row['bench_s']:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict) -> str:
    header = ("router", "failed", "failed (stream)", "in flight on failed", "avoidable", "added p50 / p99 ms",
              "peak RSS MiB", "start s", "top replica", "goal")
    rows = [header]
    for r in results["routers"]:
        plain, streamed = r["plain"], r["stream"]
        goal = plain["goal_met"] and streamed["goal_met"]
        rows.append((r["router"], f"{plain['failed']} / {plain['requests']}",
                     f"{streamed['failed']} / {streamed['requests']}",
                     f"{plain['in_flight_total']} / {streamed['in_flight_total']}",
                     f"{plain['avoidable']} / {streamed['avoidable']}",
                     f"{plain['added_p50_ms']:.1f} / {plain['added_p99_ms']:.1f}",
                     f"{r['peak_rss_mib']:.0f}", f"{r['start_s']:.2f}", f"{plain['top_share_before_faults']:.0%}",
                     "met" if goal else "MISSED"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    direct = results["direct"]
    lines.append(f"({results['requests']} requests and {results['stream_requests']} streaming ones, "
                 f"{results['concurrency']} in flight, 3 replicas answering in {results['reply_s']} s; "
                 f"{results['schedule']}; deadline {results['deadline_s']:g} s. In flight and avoidable: "
                 f"non-streaming / streaming pass; avoidable: failed requests that were not in flight on a "
                 f"failed replica when it failed. Added latency: the non-streaming pass's successes over "
                 f"direct p50 {direct['p50_ms']:.1f} / p99 {direct['p99_ms']:.1f} ms. Top replica: its share "
                 f"of the non-streaming requests before the first fault (an even spread is 33%). "
                 f"Goal: failed <= in flight on the failed replicas, both passes)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600, help="non-streaming requests per router (600)")
    parser.add_argument("--stream-requests", type=int, default=300, help="streaming requests per router (300)")
    parser.add_argument("--concurrency", type=int, default=12, help="requests in flight (12)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S,
                        help=f"seconds a request may take ({DEADLINE_S:g})")
    parser.add_argument("--routers", default="", help=f"comma-separated, of: {', '.join(ROUTERS)}")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--fixed-targets", action="store_true",
                        help="kill replica 1 and stop replica 2 (default: the busiest at that moment)")
    args = parser.parse_args(argv)
    if min(args.requests, args.stream_requests) < 3 or args.concurrency < 1 or not args.deadline > 0:
        parser.error("--requests and --stream-requests must be at least 3, --concurrency and --deadline above 0")
    return Settings(args.requests, args.stream_requests, args.concurrency, args.deadline,
                    [n for n in args.routers.split(",") if n], args.json, args.fixed_targets)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    results = run(settings)
    print(table(results))
    if settings.json_out is not None:
        settings.json_out.parent.mkdir(parents=True, exist_ok=True)
        settings.json_out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written: {settings.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
