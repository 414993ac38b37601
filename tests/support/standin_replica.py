"""STAND-IN for one lmdeploy api_server replica behind the proxy (the GPU engine cannot run here).

It is tests/support/standin_openai.py (same endpoints, JSON shapes and API-key rule as lmdeploy 0.18's
api_server: ``/health``, ``/v1/models``, ``/v1/chat/completions``, ``/metrics`` whose
``lmdeploy:request_success_total`` counts the chats this replica answered), plus one behaviour the
proxy tests need:

- ``SIGUSR1`` toggles "stuck": ``/health`` still accepts the connection and reads the request but
  never answers (a wedged engine), while the other endpoints keep working;
- ``--reply-delay S``: each chat is answered after S seconds (a slower engine), for routing tests.

    python tests/support/standin_replica.py --port P [--model-name NAME] [--api-keys k1,k2] [--unhealthy-seconds S]
        [--reply-delay S]
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import standin_openai  # (found through the path above)

STUCK = threading.Event()
REPLY_DELAY_S = [0.0]
_original = standin_openai.make_handler


def make_handler(state):
    base = _original(state)

    class Handler(base):
        def do_GET(self) -> None:
            if STUCK.is_set() and self.path.split("?", 1)[0] == "/health":
                standin_openai.log("standin_replica: /health request held (stuck)")
                while True:  # the connection stays open, nothing is ever sent
                    threading.Event().wait(3600)
            super().do_GET()

        def do_POST(self) -> None:
            if REPLY_DELAY_S[0] and self.path.split("?", 1)[0] == "/v1/chat/completions":
                time.sleep(REPLY_DELAY_S[0])
            super().do_POST()

    return Handler


def _toggle(signum, frame) -> None:
    if STUCK.is_set():
        STUCK.clear()
    else:
        STUCK.set()
    standin_openai.log(f"standin_replica: stuck={STUCK.is_set()}")


def _take_delay(argv: list[str]) -> list[str]:
    """``argv`` without ``--reply-delay S`` (the api_server stand-in's parser does not know it)."""
    if "--reply-delay" in argv:
        at = argv.index("--reply-delay")
        REPLY_DELAY_S[0] = float(argv[at + 1])
        return argv[:at] + argv[at + 2:]
    return argv


if __name__ == "__main__":
    sys.argv = _take_delay(sys.argv)
    signal.signal(signal.SIGUSR1, _toggle)
    standin_openai.make_handler = make_handler
    sys.exit(standin_openai.main())
