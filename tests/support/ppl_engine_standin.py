"""STAND-IN for lmdeploy's api_server scoring a REAL model: transformers on the CPU behind the endpoints
``launch ppl`` uses. The GPU engine cannot run here; this serves the same HTTP interface over the
model directory it is given, loaded exactly as given (``from_pretrained(model_dir)``), so the
directory's own ``config.json`` (a shipped config or launch's overlay) decides the RoPE scaling.

Endpoints, with lmdeploy 0.18's request and reply shapes (serve/openai/endpoints/auxiliary.py):

- ``GET /health``, ``GET /v1/models``;
- ``POST /v1/encode`` ``{"input": str, "add_bos": bool}`` -> ``{"input_ids": [...], "length": n}``;
- ``POST /get_ppl`` ``{"input": str | [ids]}`` -> ``{"ppl": mean next-token loss}``: the summed
  cross-entropy of targets 1..n-1 divided by ``n - 1``, as ``AsyncEngine.async_get_ppl``; inputs
  of ``session_len`` tokens or more are a 400 with lmdeploy's message.

One difference, to halve the CPU time: an input that is a prefix of the last input scored is
answered from that pass's per-token losses instead of a second forward pass. For a causal model
with a fixed RoPE this is exactly what a separate pass gives; under dynamic NTK a separate pass of
the prefix alone would rescale RoPE for the prefix's own length, so the span loss the client derives
here is the loss of the span within the full window's pass (the quantity the span loss means).
``forward_passes`` counts the real passes.

Run as a script for the README's chart: ``python -m tests.support.ppl_engine_standin MODEL_DIR [PORT]``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.support.servers import JSONHandler, Standin

CHUNK = 2048  # lm_head + cross-entropy in chunks of this many positions (full logits would be GBs)


class TorchScorer:
    """Per-token next-token losses of a causal LM from ``model_dir`` (CPU, float32: on CPUs without
    bf16 matrix units a float32 pass is faster; measured 30 s against 42 s for 8,192 tokens here)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa")
        self.model.eval()
        self.rope_type = getattr(self.model.model.rotary_emb, "rope_type", None)
        self.forward_passes = 0
        self._last: tuple[list[int], list[float]] | None = None
        self._lock = threading.Lock()

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if add_bos and bos is not None else ids

    def losses(self, ids: list[int]) -> list[float]:
        """Loss of target i (1..n-1) given tokens 0..i-1; reused for a prefix of the last input."""
        with self._lock:
            last = self._last
            if last is not None and len(ids) <= len(last[0]) and last[0][: len(ids)] == ids:
                return last[1][: len(ids) - 1]
            torch = self.torch
            with torch.inference_mode():
                x = torch.tensor([ids])
                hidden = self.model.model(input_ids=x).last_hidden_state[0]
                out: list[float] = []
                for start in range(0, len(ids) - 1, CHUNK):
                    stop = min(start + CHUNK, len(ids) - 1)
                    logits = self.model.lm_head(hidden[start:stop]).float()
                    targets = x[0, start + 1: stop + 1]
                    out.extend(torch.nn.functional.cross_entropy(logits, targets, reduction="none").tolist())
            self.forward_passes += 1
            self._last = (list(ids), out)
            return out


class EngineStandin(Standin):
    """``with EngineStandin(model_dir) as server: server.url`` (or pass a loaded ``scorer``)."""

    def __init__(self, model_dir: str | Path | None = None, *, scorer: TorchScorer | None = None,
                 session_len: int = 32768, model_name: str = "smollm2-135m", port: int = 0) -> None:
        self.scorer = scorer or TorchScorer(model_dir)  # type: ignore[arg-type]
        self.session_len = session_len
        self.model_name = model_name
        self.port = port
        self.requests: list[tuple[str, int]] = []  # (path, input tokens)

    def handler(self) -> type[_Handler]:
        return _Handler


class _Handler(JSONHandler):
    state: EngineStandin
    protocol_version = "HTTP/1.1"

    def _error(self, status: int, message: str) -> None:
        self.send_json(status, {"message": message, "type": "invalid_request_error", "code": status,
                                "param": None, "object": "error"})

    def do_GET(self) -> None:
        if self.path == "/health":
            return self.send_json(200, {"status": "healthy"})
        if self.path == "/v1/models":
            card = {"id": self.state.model_name, "object": "model", "created": int(time.time()),
                    "owned_by": "lmdeploy", "root": self.state.model_name, "parent": None, "permission": []}
            return self.send_json(200, {"object": "list", "data": [card]})
        self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        scorer = self.state.scorer
        if self.path == "/v1/encode":
            text = body.get("input")
            if not isinstance(text, str):
                return self._error(400, "this stand-in encodes one string")
            ids = scorer.encode(text, bool(body.get("add_bos", True)))
            return self.send_json(200, {"input_ids": ids, "length": len(ids)})
        if self.path == "/get_ppl":
            given = body.get("input")
            ids = scorer.encode(given, False) if isinstance(given, str) else given
            if not ids:
                return self._error(400, "Input must not be empty.")
            if len(ids) >= self.state.session_len:
                return self._error(400, f"Input length ({len(ids)}) must be smaller than the model context "
                                        f"length ({self.state.session_len}).")
            if len(ids) < 2:
                return self._error(400, "input must have at least 2 tokens to compute ppl.")
            self.state.requests.append((self.path, len(ids)))
            losses = scorer.losses(list(ids))
            return self.send_json(200, {"ppl": sum(losses) / (len(ids) - 1)})
        self.send_json(404, {"detail": "Not Found"})


if __name__ == "__main__":
    import sys

    with EngineStandin(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 23333) as server:
        print(f"stand-in engine for {sys.argv[1]} (RoPE {server.scorer.rope_type}) at {server.url}", flush=True)
        threading.Event().wait()
