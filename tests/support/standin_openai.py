"""STAND-IN for lmdeploy's OpenAI ``api_server`` process (the GPU engine cannot run here).

It exists only so the supervisor (``launcher.runtime.supervise``) can be tested against a real process and a
real HTTP server. It keeps the interface of lmdeploy 0.18's api_server where the supervisor and
the smoke test touch it:

- like ``lmdeploy.serve.openai.api_server.serve`` the port stays CLOSED while "weights load"
  (the engine is built before uvicorn binds), then it binds and answers;
- ``GET /health``: 200 ``{"status": "healthy", ...}``; 503 ``{"status": "initializing", ...}``
  while the engine is not ready yet;
- ``GET /v1/models``: an OpenAI ``ModelList``;
- ``POST /v1/chat/completions``: an OpenAI ``ChatCompletionResponse`` (or an SSE stream with
  ``"stream": true``); an unknown model is a 404 in lmdeploy's error envelope;
- ``GET /metrics``: Prometheus text with lmdeploy's metric names;
- API keys as lmdeploy's ``AuthenticationMiddleware`` does: every path except ``/health``,
  ``/docs``, ``/redoc`` and ``/nodes`` needs ``Authorization: Bearer <key>`` (so ``/metrics``
  needs it too; lmdeploy's docstring says "/v1 only" but its code checks every other path).

It logs each request line to stderr in uvicorn's format. Behaviour switches (for the tests):

    python tests/support/standin_openai.py --port P [--host H] [--model-name NAME]
        [--load-seconds S]            port closed for S seconds while "weights load"
        [--unhealthy-seconds S]       bound, but /health answers 503 for S seconds
        [--die-after S --exit-code C] log some lines, then exit C while starting (before binding)
        [--ignore-sigterm]            ignore SIGTERM (the supervisor must SIGKILL after its grace);
                                      each one is logged as ``SIGTERM ignored at T`` (time.monotonic())
        [--api-keys k1,k2]            require one of these bearer keys
        [--spawn-child]               start a helper process in the same group (like an engine's
                                      worker processes); its pid is logged as ``child pid N``
        [--spawn-detached]            start a helper in a session and process group of its own (as
                                      some engines' workers do); logged as ``detached child pid N``
        [--reply-seconds S|LOW-HIGH]  each chat completion takes S seconds (or a uniform draw from
                                      LOW to HIGH per request) before it answers; a stream spreads them
                                      over its chunks. Chats are served concurrently (a thread each)
        [--log-chats]                 log ``standin: chat start N T "PROMPT"`` when chat N starts
                                      (PROMPT: its last message's first 80 characters, as JSON) and
                                      ``standin: chat end N T`` once its answer is written or
                                      abandoned (T: time.monotonic(), one clock for every process
                                      of the machine), so a harness can tell which chats were in
                                      flight when it killed or stopped this server
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root

from tests.support.servers import JSONHandler, QuietServer, serving

OPEN_PREFIXES = ("/health", "/docs", "/redoc", "/nodes")


def log(line: str) -> None:
    print(line, flush=True)


def log_line(line: str) -> None:
    """``line`` as one write(2): lines of concurrent chats do not interleave."""
    os.write(1, (line + "\n").encode())


def last_prompt(raw: bytes) -> str:
    """The first 80 characters of a chat request's last message ("" if it has none)."""
    try:
        return str(json.loads(raw)["messages"][-1]["content"])[:80]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def reply_seconds(text: str) -> tuple[float, float]:
    """``--reply-seconds``: ``S`` or ``LOW-HIGH`` (seconds, at least 0) as ``(low, high)``."""
    low, sep, high = text.partition("-")
    try:
        bounds = (float(low), float(high) if sep else float(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not S or LOW-HIGH seconds: {text!r}") from None
    if not (0 <= bounds[0] <= bounds[1] < float("inf")):
        raise argparse.ArgumentTypeError(f"need 0 <= LOW <= HIGH: {text!r}")
    return bounds


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model_name: str = args.model_name
        self.healthy_at = time.monotonic() + args.unhealthy_seconds
        self.key_hashes = [hashlib.sha256(k.encode()).digest() for k in args.api_keys]
        self.lock = threading.Lock()
        self.reply_seconds: tuple[float, float] = args.reply_seconds
        self.log_chats: bool = args.log_chats
        self.chat_numbers = itertools.count(1)
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "request_success_total": 0}

    def reply_delay(self) -> float:
        low, high = self.reply_seconds
        return random.uniform(low, high) if high > low else low

    def authorized(self, header: str | None) -> bool:
        if not self.key_hashes:
            return True
        if not header:
            return False
        scheme, _, param = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(param.encode()).digest()
        ok = False
        for known in self.key_hashes:
            ok |= secrets.compare_digest(digest, known)
        return ok


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(JSONHandler):
        protocol_version = "HTTP/1.1"
        server_version = "uvicorn"
        sys_version = ""
        json_headers = ("content-type", "content-length")  # as uvicorn writes them
        disable_nagle_algorithm = True  # TCP_NODELAY, as uvicorn: a body is not held back ~40 ms behind its headers

        def log_request(self, code="-", size="-") -> None:
            host, port = self.client_address[:2]
            phrase = ""
            try:
                phrase = " " + HTTPStatus(int(code)).phrase
            except (ValueError, TypeError):
                pass
            sys.stderr.write(f'INFO:     {host}:{port} - "{self.requestline}" {code}{phrase}\n')
            sys.stderr.flush()

        # -- helpers ---------------------------------------------------------------------------
        def send_error_envelope(self, status: int, message: str, type_: str) -> None:
            self.send_json(status, {"message": message, "type": type_, "code": status, "param": None,
                                    "object": "error"})

        def guard(self) -> bool:
            path = self.path.split("?", 1)[0]
            if path.startswith(OPEN_PREFIXES) or state.authorized(self.headers.get("Authorization")):
                return True
            self.send_error_envelope(401, "Unauthorized.", "authentication_error")
            return False

        # -- routes ----------------------------------------------------------------------------
        def do_GET(self) -> None:
            if not self.guard():
                return
            path = self.path.split("?", 1)[0]
            if path == "/health":
                if time.monotonic() >= state.healthy_at:
                    self.send_json(200, {"status": "healthy", "message": "Engine is healthy."})
                else:
                    self.send_json(503, {"status": "initializing",
                                         "message": "Engine health monitor is starting."})
            elif path == "/v1/models":
                now = int(time.time())
                card = {"id": state.model_name, "object": "model", "created": now, "owned_by": "lmdeploy",
                        "root": state.model_name, "parent": None,
                        "permission": [{"id": f"modelperm-{uuid.uuid4().hex[:22]}",
                                        "object": "model_permission", "created": now,
                                        "allow_create_engine": False, "allow_sampling": True,
                                        "allow_logprobs": True, "allow_search_indices": True,
                                        "allow_view": True, "allow_fine_tuning": False,
                                        "organization": "*", "group": None, "is_blocking": False}]}
                self.send_json(200, {"object": "list", "data": [card]})
            elif path.startswith("/metrics"):
                self.send_metrics()
            else:
                self.send_json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not self.guard():
                return
            path = self.path.split("?", 1)[0]
            if path != "/v1/chat/completions":
                self.send_json(404, {"detail": "Not Found"})
                return
            if not state.log_chats:
                self.chat(raw)
                return
            number = next(state.chat_numbers)
            log_line(f"standin: chat start {number} {time.monotonic()!r} {json.dumps(last_prompt(raw))}")
            try:
                self.chat(raw)
            finally:
                log_line(f"standin: chat end {number} {time.monotonic()!r}")

        def chat(self, raw: bytes) -> None:
            try:
                request = json.loads(raw or b"null")
                messages = request["messages"]
                model = request["model"]
                if not isinstance(messages, list) or not messages:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                self.send_error_envelope(400, "messages: Field required", "invalid_request_error")
                return
            if model != state.model_name:
                self.send_error_envelope(404, f"The model {model!r} does not exist.", "not_found_error")
                return
            last = str(messages[-1].get("content", "")) if isinstance(messages[-1], dict) else ""
            reply = f"stand-in reply to: {last}"
            prompt_tokens = sum(len(str(m.get("content", "")).split())
                                for m in messages if isinstance(m, dict))
            completion_tokens = len(reply.split())
            with state.lock:
                state.counters["prompt_tokens_total"] += prompt_tokens
                state.counters["generation_tokens_total"] += completion_tokens
                state.counters["request_success_total"] += 1
            ident, created = f"chatcmpl-{uuid.uuid4().hex[:22]}", int(time.time())
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                     "completion_tokens": completion_tokens}
            delay = state.reply_delay()
            if request.get("stream"):
                self.stream_reply(ident, created, reply, usage, delay)
                return
            time.sleep(delay)
            self.send_json(200, {
                "id": ident, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply,
                                                     "reasoning_content": None, "tool_calls": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "service_tier": None,
            })

        def stream_reply(self, ident: str, created: int, reply: str, usage: dict, delay: float = 0.0) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            words = reply.split(" ")
            for i, word in enumerate(words):
                if delay:
                    time.sleep(delay / len(words))
                chunk = {"id": ident, "object": "chat.completion.chunk", "created": created,
                         "model": state.model_name,
                         "choices": [{"index": 0, "delta": {"role": "assistant",
                                                            "content": word if i == 0 else " " + word},
                                      "logprobs": None,
                                      "finish_reason": "stop" if i == len(words) - 1 else None}]}
                if i == len(words) - 1:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def send_metrics(self) -> None:
            labels = f'engine="0",model_name="{state.model_name}"'
            lines = ["# HELP lmdeploy:num_requests_running Number of requests in model execution batches.",
                     "# TYPE lmdeploy:num_requests_running gauge",
                     f"lmdeploy:num_requests_running{{{labels}}} 0.0",
                     "# HELP lmdeploy:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.",
                     "# TYPE lmdeploy:gpu_cache_usage_perc gauge",
                     f"lmdeploy:gpu_cache_usage_perc{{{labels}}} 0.0"]
            with state.lock:
                for name, value in state.counters.items():
                    lines += [f"# HELP lmdeploy:{name} {name.replace('_', ' ')}.",
                              f"# TYPE lmdeploy:{name} counter",
                              f"lmdeploy:{name}{{{labels}}} {float(value)}"]
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stand-in for lmdeploy's api_server (tests only).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-name", default="standin-model")
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--unhealthy-seconds", type=float, default=0.0)
    parser.add_argument("--die-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--api-keys", default="", type=lambda s: [k for k in s.split(",") if k])
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--spawn-detached", action="store_true")
    parser.add_argument("--reply-seconds", type=reply_seconds, default=(0.0, 0.0))
    parser.add_argument("--log-chats", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: os.write(1, f"standin: SIGTERM ignored at {time.monotonic()!r}\n"
                                                                .encode()))  # not print: it may interrupt one
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    log(f"standin: pid {os.getpid()} serving {args.model_name} (stand-in for lmdeploy api_server)")
    if args.spawn_child:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        log(f"standin: child pid {helper.pid}")
    if args.spawn_detached:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        log(f"standin: detached child pid {helper.pid}")
    log("[TM][INFO] building the engine")

    if args.die_after is not None:
        time.sleep(args.die_after)
        log("[TM][INFO] loading weights: 1/4")
        log("Traceback (most recent call last):")
        log('  File "engine.py", line 1, in <module>')
        log("RuntimeError: stand-in failure while loading weights")
        return args.exit_code

    deadline = time.monotonic() + args.load_seconds
    step = 0
    while time.monotonic() < deadline:
        if stop.is_set():
            log("standin: stopped while loading")
            return 0
        step += 1
        log(f"[TM][INFO] loading weights: step {step}")
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    # uvicorn listens with a backlog of 2048; socketserver's default of 5 drops the SYNs of a burst of
    # new connections (a router opening its pool), and each of those waits ~1 s for a retransmission.
    QuietServer.request_queue_size = 2048  # this process's server only: it is the stand-in's own process
    with serving(make_handler(State(args)), args.host, args.port, poll_interval=0.05):
        log("INFO:     Started server process")
        log(f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
        while not stop.wait(0.1):
            pass
        log("INFO:     Shutting down")
    log("INFO:     Finished server process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
