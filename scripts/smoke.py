"""`make smoke`: the whole path on a GPU box, through the real `launch serve` and lmdeploy TurboMind.

1. Builds a tiny random-weight Llama locally (native context 256; no download), or takes the preset
   named by SMOKE_MODEL (downloaded from the Hub).
2. Runs `launch serve MODEL --factor 2 --port P` and waits for it to be ready.
3. Sends a chat completion whose prompt is longer than the native context: expects generated tokens.
4. Sends one longer than session_len: expects HTTP 400.
5. Checks /metrics, stops the server with Ctrl-C (SIGINT), expects exit 0 and the port closed.

With ``--replicas N`` (a box with N GPUs): `launch serve MODEL --factor F --replicas N --port P`,
lmdeploy's proxy on P and N replicas on P+1..P+N, one GPU each. Ready when the proxy lists N
nodes; then 2N long chats through the proxy must all be answered (no HTTP-200 error bodies) and
the proxy's log must show requests dispatched to every replica; the too-long prompt goes to
replica 0 directly (the proxy turns a non-streaming 400 into 200); one Ctrl-C must close every
port.

Without a GPU it stops at the engine step with launch's own error and exits 1: never a pass
(``--replicas`` checks the GPUs first and stops before building the model).
Environment: SMOKE_MODEL (a preset), SMOKE_FACTOR (default 2), SMOKE_BACKEND (turbomind),
SMOKE_TIMEOUT (seconds to become ready, default 1200), SMOKE_OUT (work directory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.net import http as client  # the checkout's launcher, found through ROOT
from launcher.runtime.address import free_ports

TINY_NATIVE = 256


def say(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def fail(message: str, log: list[str] | None = None) -> int:
    """The server's output was echoed as it came; name where it ends and why this is a failure."""
    if log:
        print(f"(last of {len(log)} lines of launch serve's output above)", file=sys.stderr)
    print(f"SMOKE FAILED: {message}", file=sys.stderr, flush=True)
    return 1


def http(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    """(status, body text) of GET (or POST of ``body``) through launch's own client; (0, why) when
    nothing answered within ``timeout``."""
    try:
        reply = client.request("GET" if body is None else "POST", url, json_body=body, timeout=timeout)
    except (client.Unreachable, client.DeadlineExceeded) as err:
        return 0, str(err)
    return reply.status, reply.body.decode("utf-8", "replace")


def pump(stream, sink: list[str], echo) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        echo.write(line)
        echo.flush()


def count_tokens(root: str, text: str) -> int | None:
    status, body = http(root + "/v1/encode", {"input": text, "add_bos": False})
    return json.loads(body)["length"] if status == 200 else None


def prompt_of(root: str, tokens: int) -> str:
    words = ("the sky is blue and the grass is green here again " * (tokens // 4 + 50)).split()
    text = " ".join(words[:tokens])
    measured = count_tokens(root, text)
    if measured:  # adjust to the model's own tokenizer
        text = " ".join(words[: max(1, round(tokens * tokens / measured))])
    return text


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1."""
    try:
        return free_ports(n)
    except OSError as err:
        raise SystemExit(fail(str(err))) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="launch's smoke test on a GPU box (see the module docstring)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="serve N replicas (one GPU each) behind lmdeploy's proxy; needs N GPUs")
    args = parser.parse_args(argv)
    if not 1 <= args.replicas <= 64:
        parser.error("--replicas must be a whole number from 1 to 64")
    return args


def gpu_problem(replicas: int) -> str | None:
    """Why this box cannot run ``replicas`` one-GPU replicas (None when it can)."""
    from launcher.runtime.gpu import free_memory, nvidia_problem

    if problem := nvidia_problem():
        return f"--replicas {replicas} needs {replicas} NVIDIA GPUs: {problem}"
    count = len(free_memory() or [])
    if count < replicas:
        return f"--replicas {replicas} needs {replicas} GPUs; {count} are visible here"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    replicas = args.replicas
    if replicas > 1 and (problem := gpu_problem(replicas)):
        return fail(problem)
    work = Path(os.environ.get("SMOKE_OUT") or tempfile.mkdtemp(prefix="launch-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    factor = os.environ.get("SMOKE_FACTOR", "2")
    model = os.environ.get("SMOKE_MODEL")
    env = dict(os.environ, LAUNCH_CACHE_DIR=str(work / "launch-cache"), PYTHONUNBUFFERED="1")
    if model:
        from launcher.model.presets import get_preset

        native = get_preset(model).native_context
        say(f"model: preset {model} (native {native}), downloaded from the Hub")
    else:
        from launcher.model.tinymodel import make_tiny_llama

        path = work / "tiny-llama"
        if not (path / "config.json").exists():
            make_tiny_llama(path, native_context=TINY_NATIVE)
        model, native = str(path), TINY_NATIVE
        say(f"model: tiny random-weight Llama at {path} (native {native})")

    port = free_port_run(replicas + 1 if replicas > 1 else 1)
    root = f"http://127.0.0.1:{port}"  # the proxy with --replicas
    replica_urls = [f"http://127.0.0.1:{port + 1 + i}" for i in range(replicas)] if replicas > 1 else [root]
    direct = replica_urls[0]  # one engine, asked directly (token counts, the 400)
    argv = [sys.executable, "-m", "launcher", "serve", model, "--factor", factor, "--port", str(port),
            "--backend", os.environ.get("SMOKE_BACKEND", "turbomind")]
    if replicas > 1:
        argv += ["--replicas", str(replicas)]
    say("running: launch " + " ".join(argv[3:]))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    for stream, echo in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        threading.Thread(target=pump, args=(stream, log, echo), daemon=True).start()

    deadline = time.monotonic() + float(os.environ.get("SMOKE_TIMEOUT", "1200"))
    while True:
        if proc.poll() is not None:
            time.sleep(0.5)
            return fail(f"`launch serve` exited with code {proc.returncode} before the server was ready "
                        "(on a machine without a GPU and TurboMind this is expected: the smoke test needs one)", log)
        if replicas == 1 and http(root + "/health", timeout=5)[0] == 200:
            break
        if replicas > 1:
            status, body = http(root + "/nodes/status", timeout=5)
            if status == 200 and len(json.loads(body)) == replicas:
                break
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGINT)
            return fail("the server did not become ready in time", log)
        time.sleep(1)
    say("server ready")

    try:
        status, body = http(root + "/v1/models")
        name = json.loads(body)["data"][0]["id"]
        session_len = round(native * float(factor))

        long_prompt = prompt_of(direct, int(native * 1.5))
        for _ in range(2 * replicas):
            status, body = http(root + "/v1/chat/completions", {
                "model": name, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 16,
                "temperature": 0,
            })
            if status != 200 or "error_code" in json.loads(body):
                return fail(f"a prompt past the native context got HTTP {status}: {body[:300]}", log)
        usage = json.loads(body)["usage"]
        if usage["prompt_tokens"] <= native or usage["completion_tokens"] < 1:
            return fail(f"expected > {native} prompt tokens and generated tokens, got {usage}", log)
        say(f"prompt of {usage['prompt_tokens']} tokens (native {native}): {usage['completion_tokens']} tokens generated")

        if replicas > 1:
            proxy_log = (work / "launch-cache" / "runs" / f"proxy-{port}" / "proxy.log").read_text(errors="replace")
            missed = [url for url in replica_urls if f"dispatched to {url}" not in proxy_log]
            if missed:
                return fail(f"the proxy dispatched no request to {', '.join(missed)} (see its log)", log)
            say(f"{2 * replicas} chats through the proxy, all answered, dispatched to all {replicas} replicas")

        too_long = prompt_of(direct, session_len + 64)
        status, body = http(direct + "/v1/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": too_long}], "max_tokens": 4})
        if status != 400:
            return fail(f"a prompt past session_len {session_len} should get HTTP 400, got {status}: {body[:300]}", log)
        say(f"prompt past session_len {session_len}: HTTP 400 as expected")

        status, body = http(direct + "/metrics")
        if status != 200 or "# TYPE" not in body:
            return fail(f"/metrics answered {status}", log)
        say("/metrics: Prometheus text")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    if proc.returncode != 0:
        return fail(f"`launch serve` exited with {proc.returncode} after Ctrl-C", log)
    for p in range(port, port + (replicas + 1 if replicas > 1 else 1)):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                return fail(f"port {p} still answers after the stop", log)
    say("stopped cleanly with Ctrl-C")
    print("SMOKE PASSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
