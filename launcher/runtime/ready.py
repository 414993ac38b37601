"""What the user is told once the server is ready: where it is, how to call it (no secret shown)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from launcher.runtime.address import is_wildcard

CURL_KEY_PLACEHOLDER = "$LAUNCH_API_KEY"


@dataclass(frozen=True)
class ReadyInfo:
    """Where the ready server is. ``api_key`` (the first key, for a probe's own requests) is kept out
    of ``repr`` and of everything printable; the curl example uses ``$LAUNCH_API_KEY`` instead."""

    host: str  # as given (may be 0.0.0.0)
    port: int
    root_url: str  # http://127.0.0.1:23333 (reachable from this machine)
    base_url: str  # root_url + "/v1": the OpenAI base URL
    model_name: str
    served_models: tuple[str, ...]
    pid: int
    log_path: Path
    startup_s: float
    auth: bool = False
    api_key: str | None = field(default=None, repr=False)

    @property
    def health_url(self) -> str:
        return self.root_url + "/health"

    @property
    def metrics_url(self) -> str:
        return self.root_url + "/metrics"

    def headers(self) -> dict[str, str]:
        """Headers a request to the server needs (``Authorization`` when keys are set)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def curl_example(self) -> str:
        """A chat request to paste into a shell (keys: the placeholder ``$LAUNCH_API_KEY``)."""
        body = {"model": self.model_name, "messages": [{"role": "user", "content": "Hello!"}]}
        parts = [f"curl {self.base_url}/chat/completions", "-H 'Content-Type: application/json'"]
        if self.auth:
            parts.append(f'-H "Authorization: Bearer {CURL_KEY_PLACEHOLDER}"')
        parts.append(f"-d {shlex.quote(json.dumps(body))}")
        return " \\\n  ".join(parts)

    def summary_lines(self) -> list[str]:
        """The lines to print once the server is ready (no secret in them)."""
        return [
            f"Serving {self.model_name}: OpenAI API at {self.base_url}  (Ctrl-C stops it)",
            f"  health {self.health_url}   metrics {self.metrics_url}",
            f"  log    {self.log_path}",
            *self.access_lines(),
        ]

    def access_lines(self) -> list[str]:
        """How to reach it: the all-interfaces note, the API-key hint and the curl example (the tail
        of every ready summary: one server's, or the proxy's in front of replicas)."""
        lines = []
        if is_wildcard(self.host):
            lines.append(f"  listening on all interfaces ({self.host}): other machines use this "
                         f"machine's address, port {self.port}")
        if self.auth:
            lines.append("  API keys are required: export LAUNCH_API_KEY=<one of your keys>, then")
        lines.append("Try it:")
        lines += ["  " + line for line in self.curl_example().splitlines()]
        return lines
