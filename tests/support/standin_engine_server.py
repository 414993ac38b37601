"""STAND-IN for ``python -m launcher.engine.server SPEC.json`` (the GPU engine cannot run here).

Same interface as the real serving process: one argument, the spec's path (launch passes
``/dev/stdin`` and writes the spec into a pipe); it binds the spec's host and port, serves the
spec's model name with the spec's API keys, and stops on SIGTERM or SIGINT. For the tests it logs
the spec it was given on one line (``SPEC_PREFIX`` + JSON, the API keys as their SHA-256), which
``spec_seen`` reads back from its log. Behind the HTTP endpoints is the probe's stand-in "model" (tests/support/probe_standin.py) with
the spec's session_len, seeing the whole prompt. It logs like the real one so that the supervisor
has a log to show.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.probe_standin import ProbeStandin

SPEC_PREFIX = "stand-in engine_server spec: "


def key_digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def spec_seen(log: Path) -> dict:
    """The last spec a stand-in engine logged in ``log`` (its API keys as ``key_digest``)."""
    lines = [line for line in log.read_text().splitlines() if line.startswith(SPEC_PREFIX)]
    return json.loads(lines[-1][len(SPEC_PREFIX):])


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    print(SPEC_PREFIX + json.dumps({**spec, "api_keys": [key_digest(k) for k in spec["api_keys"]]}),
          file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    session_len = spec["engine_config"]["session_len"]
    print(f"stand-in engine_server: {spec['backend']} session_len={session_len} model {spec['model_path']}",
          file=sys.stderr, flush=True)
    time.sleep(0.3)  # "loading weights": the port stays closed meanwhile, as with lmdeploy
    with ProbeStandin(visible=session_len, session_len=session_len, model=spec["model_name"],
                      api_keys=tuple(spec["api_keys"]), host=spec["server_name"], port=spec["server_port"]):
        print("INFO:     Uvicorn running", file=sys.stderr, flush=True)
        stop.wait()
    print("INFO:     Finished server process", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
