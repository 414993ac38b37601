"""STAND-IN for an lmdeploy 0.18 ``api_server`` serving a model, for the passkey probe's tests.

A GPU engine cannot run here, so this is a real HTTP server on 127.0.0.1 (random port, in a thread)
with the endpoints and JSON shapes of lmdeploy's api_server that ``launch probe`` uses:

- ``GET /v1/models``: an OpenAI ``ModelList``;
- ``POST /v1/encode`` ``{"input": str | [str], "add_bos": bool}`` -> ``{"input_ids", "length"}``
  (lmdeploy's ``EncodeRequest`` / ``EncodeResponse``; ``add_bos`` defaults to true as there);
- ``POST /v1/chat/completions``: an OpenAI ``ChatCompletionResponse`` with ``usage``; the prompt is
  the chat template applied to the messages (so ``prompt_tokens`` is a few tokens more than the
  message text, as with a real model); an unknown model is a 404;
- a prompt of ``session_len`` tokens or more is a 400 with lmdeploy's error envelope and message
  (``Input length (N) must be smaller than the model context length (S).``);
- with API keys, every path but ``/health``, ``/docs``, ``/redoc``, ``/nodes`` needs
  ``Authorization: Bearer <key>``, else 401 ``Unauthorized.`` in the same envelope.

Its "model": the tokenizer splits words and single punctuation marks (one token each, deterministic),
and the model can see only the first ``visible`` tokens of the prompt: it answers the pass key when
the pass key line lies within them, else a wrong number. ``reply`` overrides the answer (nonsense),
``encode=False`` removes ``/v1/encode`` (404, as on a server without it), ``chat_delay`` slows each
answer, ``drop_after`` closes the connection unanswered from that chat request on (a server that died),
``hang_after`` leaves every chat request from that one on unanswered (a stuck engine); ``hang(kind, n)``
says more finely which to leave unanswered (``kind`` "chat" or "ppl", ``n`` its 1-based count so far);
``raw`` maps a path to ``(status, body bytes)`` sent exactly as given (a broken or hostile server:
NaN, an error body, control characters; it may be changed while the stand-in runs), or to a function
of the request's 1-based count on that path giving that pair or None (then it answers as usual),
``proxy_error`` answers chat and ppl requests with HTTP 200 and lmdeploy's proxy error body
(``{"error_code": 10402, "text": ...}``, sent while a dead node is still registered), and
``basic_auth=(user, password)`` puts the server behind HTTP Basic auth (a reverse proxy's).

For ``launch ppl``: ``POST /get_ppl`` ``{"input": str | [ids]}`` -> ``{"ppl": mean loss}`` as lmdeploy's
(the sum of the next-token losses over ``len(ids) - 1`` targets); the stand-in's loss of the token at
position ``i`` (0-based, predicted from the ones before) is ``loss_at(i)``: flat ``base_loss`` within
``visible`` tokens, then rising by ``loss_slope`` per token past it, like a model past its native
context. ``ppl=False`` removes the endpoint (404, as on vLLM). Every scored input is recorded in
``ppl_inputs``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import zlib
from collections.abc import Callable

from tests.support.servers import JSONHandler, Standin

OPEN_PREFIXES = ("/health", "/docs", "/redoc", "/nodes")
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
BOS = "<s>"
WRONG_ANSWER = "I am not sure. Maybe the pass key is 7."


def tokenize(text: str, add_bos: bool = False) -> list[str]:
    tokens = TOKEN_RE.findall(text)
    return [BOS, *tokens] if add_bos else tokens


def token_ids(tokens: list[str]) -> list[int]:
    return [zlib.crc32(t.encode()) % 32000 for t in tokens]


def chat_template(messages: list[dict]) -> str:
    parts = [f"<|{m.get('role', 'user')}|>\n{m.get('content') or ''}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


def error_body(status: int, message: str, kind: str) -> dict:
    """lmdeploy's ``ErrorResponse`` envelope (serve/openai/protocol.py)."""
    return {"message": message, "type": kind, "code": status, "param": None, "object": "error"}


Raw = tuple[int, bytes] | Callable[[int], tuple[int, bytes] | None]


class ProbeStandin(Standin):
    """Start with ``with ProbeStandin(visible=1000) as server: server.url``."""

    def __init__(self, *, visible: int = 1000, session_len: int = 4096, model: str = "standin-7b-chat",
                 api_keys: tuple[str, ...] = (), encode: bool = True, reply: str | None = None,
                 chat_delay: float = 0.0, drop_after: int | None = None, host: str = "127.0.0.1",
                 port: int = 0, hang_after: int | None = None, proxy_error: bool = False,
                 basic_auth: tuple[str, str] | None = None, ppl: bool = True, base_loss: float = 2.0,
                 loss_slope: float = 0.01, hang: Callable[[str, int], bool] | None = None,
                 raw: dict[str, Raw] | None = None) -> None:
        self.host = host
        self.port = port
        self.visible = visible
        self.session_len = session_len
        self.model = model
        self.key_hashes = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.encode = encode
        self.reply = reply
        self.chat_delay = chat_delay
        self.drop_after = drop_after
        self.hang = hang or (lambda kind, n: kind == "chat" and hang_after is not None and n > hang_after)
        self.raw = dict(raw or {})
        self.raw_counts: dict[str, int] = {}
        self.proxy_error = proxy_error
        self.basic_auth = basic_auth
        self.ppl = ppl
        self.base_loss = base_loss
        self.loss_slope = loss_slope
        self.ppl_inputs: list[list[int]] = []
        self.auth_headers: list[str] = []  # every Authorization header received
        self.hung_up_at: list[float] = []  # monotonic times a client gave up a hung request
        self.release = threading.Event()  # set on exit: hung requests end
        self.prompts: list[str] = []  # every chat prompt text received, in order
        self.encode_calls = 0
        self.ppl_calls = 0
        self.lock = threading.Lock()

    def handler(self) -> type[_Handler]:
        return _Handler

    def __exit__(self, *exc: object) -> None:
        self.release.set()  # hung requests end
        super().__exit__(*exc)

    def loss_at(self, position: int) -> float:
        """The stand-in model's next-token loss at ``position`` (its target is token ``position``)."""
        return self.base_loss + self.loss_slope * max(0, position - self.visible)

    def mean_loss(self, n_tokens: int) -> float:
        """What ``/get_ppl`` answers for an input of ``n_tokens`` tokens (targets 1..n-1)."""
        return sum(self.loss_at(i) for i in range(1, n_tokens)) / (n_tokens - 1)

    def answer(self, prompt_tokens: list[str]) -> str:
        """What the "model" says: the pass key if its line is within the first ``visible`` tokens."""
        if self.reply is not None:
            return self.reply
        seen = " ".join(prompt_tokens[: self.visible])
        match = re.search(r"pass key is (\d+) \.", seen)
        return f"The pass key is {match.group(1)}." if match else WRONG_ANSWER


class _Handler(JSONHandler):
    state: ProbeStandin
    protocol_version = "HTTP/1.1"

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization") or ""
        with self.state.lock:
            self.state.auth_headers.append(header)
        if self.state.basic_auth is not None:
            import base64

            expected = base64.b64encode(":".join(self.state.basic_auth).encode()).decode()
            return header == f"Basic {expected}"
        if not self.state.key_hashes or self.path.startswith(OPEN_PREFIXES):
            return True
        scheme, _, key = (self.headers.get("Authorization") or "").partition(" ")
        digest = hashlib.sha256(key.encode()).digest()
        return scheme.lower() == "bearer" and digest in self.state.key_hashes

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _send_raw(self) -> bool:
        """Answer from ``raw`` when it names this path (exactly the bytes given)."""
        state = self.state
        if self.path not in state.raw:
            return False
        with state.lock:
            state.raw_counts[self.path] = count = state.raw_counts.get(self.path, 0) + 1
        reply = state.raw[self.path]
        reply = reply(count) if callable(reply) else reply
        if reply is None:
            return False
        status, body = reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def _hang(self) -> None:
        """A stuck engine: no answer until the stand-in stops or the client hangs up."""
        import select
        import socket

        state = self.state
        while not state.release.wait(0.05):
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                with state.lock:
                    state.hung_up_at.append(time.monotonic())
                break
        self.close_connection = True

    def do_GET(self) -> None:
        if not self._authorized():
            return self.send_json(401, error_body(401, "Unauthorized.", "authentication_error"))
        if self._send_raw():
            return
        if self.path == "/health":
            return self.send_json(200, {"status": "healthy"})
        if self.path == "/metrics":
            raw = f"# TYPE lmdeploy_prompts_total counter\nlmdeploy_prompts_total {len(self.state.prompts)}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        if self.path == "/v1/models":
            card = {"id": self.state.model, "object": "model", "created": int(time.time()), "owned_by": "lmdeploy",
                    "root": self.state.model, "parent": None, "permission": []}
            return self.send_json(200, {"object": "list", "data": [card]})
        self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        if not self._authorized():
            return self.send_json(401, error_body(401, "Unauthorized.", "authentication_error"))
        body = self._body()
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        if self._send_raw():
            return
        if self.path == "/v1/encode" and self.state.encode:
            with self.state.lock:
                self.state.encode_calls += 1
            add_bos = body.get("add_bos", True)
            texts = body["input"]
            if isinstance(texts, str):
                ids = token_ids(tokenize(texts, add_bos))
                return self.send_json(200, {"input_ids": ids, "length": len(ids)})
            all_ids = [token_ids(tokenize(t, add_bos)) for t in texts]
            return self.send_json(200, {"input_ids": all_ids, "length": [len(i) for i in all_ids]})
        if self.path == "/get_ppl" and self.state.ppl:
            return self._ppl(body)
        self.send_json(404, {"detail": "Not Found"})

    def _ppl(self, body: dict) -> None:
        state = self.state
        given = body.get("input")
        ids = token_ids(tokenize(given)) if isinstance(given, str) else given
        if not isinstance(ids, list) or not ids:
            return self.send_json(400, error_body(400, "Input must not be empty.", "invalid_request_error"))
        if len(ids) >= state.session_len:
            message = (f"Input length ({len(ids)}) must be smaller than the model context length "
                       f"({state.session_len}).")
            return self.send_json(400, error_body(400, message, "invalid_request_error"))
        if len(ids) < 2:
            return self.send_json(400, error_body(400, "input must have at least 2 tokens to compute ppl.",
                                              "invalid_request_error"))
        with state.lock:
            state.ppl_inputs.append(list(ids))
            state.ppl_calls += 1
            hang = state.hang("ppl", state.ppl_calls)
        if hang:
            return self._hang()
        if state.proxy_error:
            return self.send_json(200, {"error_code": 10402, "text": "Failed to get response after a period of time"})
        self.send_json(200, {"ppl": state.mean_loss(len(ids))})

    def _chat(self, body: dict) -> None:
        state = self.state
        with state.lock:
            state.prompts.append("\n".join(m.get("content") or "" for m in body.get("messages", [])))
            drop = state.drop_after is not None and len(state.prompts) > state.drop_after
            hang = state.hang("chat", len(state.prompts))
        if drop:  # the server "died": the connection closes with no answer
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if hang:
            return self._hang()
        if self._send_raw():
            return
        if state.proxy_error:  # lmdeploy's proxy while a dead node is still registered: HTTP 200, an error
            return self.send_json(200, {"error_code": 10402, "text": "Failed to get response after a period of time"})
        if body.get("model") != state.model:
            return self.send_json(404, error_body(404, f"The model {body.get('model')!r} does not exist.",
                                              "not_found_error"))
        tokens = tokenize(chat_template(body.get("messages", [])), add_bos=True)
        if len(tokens) >= state.session_len:
            message = (f"Input length ({len(tokens)}) must be smaller than the model context length "
                       f"({state.session_len}).")
            return self.send_json(400, error_body(400, message, "invalid_request_error"))
        if state.chat_delay:
            time.sleep(state.chat_delay)
        text = state.answer(tokens)
        completion = len(tokenize(text))
        self.send_json(200, {
            "id": f"chatcmpl-{len(state.prompts)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": completion,
                      "total_tokens": len(tokens) + completion},
        })


# --- helpers the probe tests share -------------------------------------------------------------


def passkey_end(prompt_text: str, passkey: str) -> int:
    """How many tokens of the templated prompt the model must see to read the whole pass key line."""
    tokens = tokenize(chat_template([{"role": "user", "content": prompt_text}]), add_bos=True)
    line = ["pass", "key", "is", passkey, "."]
    for i in range(len(tokens) - len(line) + 1):
        if tokens[i:i + len(line)] == line:
            return i + len(line)
    raise AssertionError(f"pass key {passkey} is not in the prompt")


def closed_port_url() -> str:
    """An address on 127.0.0.1 where nothing listens (connection refused)."""
    from launcher.runtime.address import free_ports

    return f"http://127.0.0.1:{free_ports(1)}"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts like a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert head[12:16] == b"IHDR", "first chunk is not IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
