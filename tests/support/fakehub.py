"""A fake Hugging Face Hub for tests: a real HTTP server on 127.0.0.1 that speaks the part of the Hub
protocol huggingface_hub 2.4 uses to download, so the real client is tested end to end (never mocked).

Served (checked against huggingface_hub 2.4's client code, see /work/shared/design/hub-facts.md):

- ``GET /api/models/{org}/{name}[/revision/{rev}]``: JSON with ``id`` and ``sha`` (the commit).
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]?recursive=..``: files (``oid`` = git blob sha1,
  ``lfs`` = {oid: sha256, size, pointerSize} for LFS files) and directories.
- ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}``: ``X-Repo-Commit`` and ``ETag`` (git sha1 for
  small files, sha256 for LFS files, as the Hub does). LFS files answer like the Hub does, with a
  302 to a CDN host that carries ``X-Linked-Etag``/``X-Linked-Size``; the "CDN" is this same server
  reached as ``localhost`` instead of ``127.0.0.1``, a different host to the client, so it drops
  the token and does not follow the redirect on HEAD, exactly as with the real CDN.
- ``Range: bytes=N-`` answered with 206 + ``Content-Range``.
- Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo): that
  header is the only way the client tells them apart.

It counts every request, and can be told to require a token (gated repo), stall (accept, read the
request, never answer), trickle (send its whole answer one byte at a time, slowly), stall in the
middle of a body, drop the connection in the middle of a body once, hang up on a request once
without answering, understate sizes in its tree listing, and stop (later connections are refused).
"""

from __future__ import annotations

import hashlib
import io
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".model", ".ckpt")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's git hooks push bigger files to LFS whatever their type


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE


def etag_of(path: str, data: bytes) -> str:
    """The ETag the Hub gives a file: sha256 of the content for LFS files, git blob sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path, data) else git_blob_sha1(data)


@dataclass
class FakeRepo:
    repo_id: str
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def push(self, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit with exactly ``files``; ``branch`` moves to it. Returns its sha."""
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        matches = [sha for sha in self.commits if len(revision) >= 7 and sha.startswith(revision)]
        return matches[0] if len(matches) == 1 else None

    def blob(self, sha256: str) -> tuple[str, bytes] | None:
        for files in self.commits.values():
            for path, data in files.items():
                if is_lfs(path, data) and hashlib.sha256(data).hexdigest() == sha256:
                    return path, data
        return None


@dataclass(frozen=True)
class Seen:
    """One request the hub received."""

    method: str
    path: str  # raw path, without the query
    query: str
    file: str | None  # the repo file a resolve/CDN request is about
    range: str | None
    authorization: str | None
    status: int


class FakeHub:
    """Use as a context manager, or ``start()``/``stop()``. ``url`` is the endpoint (HF_ENDPOINT)."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.tokens: set[str] = set()
        self.seen: list[Seen] = []
        self.hangups: list[str] = []  # paths of stalled requests whose client went away
        self.dropped: list[str] = []  # files whose body was cut off
        self.understate_sizes = False
        self._stall: Callable[[str, str, str | None], bool] | None = None
        self._trickle: tuple[Callable[[str, str], bool], float, float | None] | None = None
        self._hang_up_once: list[Callable[[str, str], bool]] = []
        self._stall_body: set[str] = set()
        self._drop_once: set[str] = set()
        self._cut_at: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.port = 0

    # --- setup ---------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> FakeRepo:
        repo = FakeRepo(repo_id, gated=gated)
        repo.push(files)
        self.repos[repo_id] = repo
        return repo

    def stall(self, when: Callable[[str, str, str | None], bool] | None = lambda m, p, f: True) -> None:
        """Accept and read matching requests ``when(method, path, file)``, never answer. None: off."""
        self._stall = when

    def trickle(self, when: Callable[[str, str], bool] | None = lambda m, p: True, every: float = 0.05,
                over: float | None = None) -> None:
        """Answer matching requests ``when(method, raw path)`` in full, but one byte every ``every``
        seconds, or each answer spread over ``over`` seconds (status line and headers included), on a
        connection closed afterwards. None: off."""
        self._trickle = None if when is None else (when, every, over)

    def hang_up_once(self, when: Callable[[str, str], bool]) -> None:
        """Close the connection of the next request ``when(method, raw path)`` without answering."""
        self._hang_up_once.append(when)

    def stall_body(self, file: str) -> None:
        """Send the headers and half the body of ``file``, then go silent (the connection stays open)."""
        self._stall_body.add(file)

    def drop_once(self, file: str, after: int | None = None) -> None:
        """Cut the connection in the next full-body GET of ``file``, after ``after`` bytes (default:
        half). huggingface_hub writes in 10 MiB chunks and resumes from what it wrote, so a cut
        past 10 MiB is what makes it send a Range request."""
        self._drop_once.add(file)
        self._cut_at[file] = after

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self) -> FakeHub:
        hub = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request, client_address):
                with hub._lock:
                    hub._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with hub._lock:
                    hub._connections.discard(request)
                super().shutdown_request(request)

        self._server = Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the port is closed and open keep-alive connections are cut."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what happened -------------------------------------------------------------------------

    def count(self, method: str | None = None, contains: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for s in self.seen
                if (method is None or s.method == method) and (contains is None or contains in s.path)
            )

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    # Headers and body go out in separate writes: with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the headers (40 ms on Linux), a cost per request no real hub has.
    disable_nagle_algorithm = True

    def log_message(self, format, *args) -> None:
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    # --- routing ---------------------------------------------------------------------------------

    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        raw_path, query = parts.path, parts.query
        self._file: str | None = None
        self._seen_args = (self.command, raw_path, query)
        with self.hub._lock:
            hang_up = next((w for w in self.hub._hang_up_once if w(self.command, raw_path)), None)
            if hang_up is not None:
                self.hub._hang_up_once.remove(hang_up)
        if hang_up is not None:
            self._note(0)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        trickle = self.hub._trickle
        if trickle is not None and trickle[0](self.command, raw_path):
            self._trickled(head, raw_path, query, *trickle[1:])
            return
        self._dispatch(head, raw_path, query)

    def _trickled(self, head: bool, raw_path: str, query: str, every: float, over: float | None) -> None:
        """The answer ``_dispatch`` gives, sent one byte at a time; stops when the client leaves."""
        real, self.wfile = self.wfile, io.BytesIO()
        try:
            self._dispatch(head, raw_path, query)
            data = self.wfile.getvalue()
        finally:
            self.wfile = real
        self.close_connection = True
        every = every if over is None else over / max(1, len(data))
        for i in range(len(data)):
            if self.hub._stopping.is_set():
                return
            try:
                real.write(data[i:i + 1])
                real.flush()
            except OSError:
                with self.hub._lock:
                    self.hub.hangups.append(raw_path)
                return
            time.sleep(every)

    def _dispatch(self, head: bool, raw_path: str, query: str) -> None:
        segments = raw_path.strip("/").split("/")
        try:
            if segments[:2] == ["api", "models"] and len(segments) >= 4:
                self._file = None
                if self._maybe_stall(raw_path):
                    return
                self._api(segments[2:], query)
            elif segments[0] == "cdn" and len(segments) == 4:
                self._file = f"(cdn){segments[3]}"
                self._cdn("/".join(segments[1:3]), segments[3], head)
            elif len(segments) >= 5 and segments[2] == "resolve":
                self._file = unquote("/".join(segments[4:]))
                if self._maybe_stall(raw_path):
                    return
                self._resolve("/".join(segments[:2]), unquote(segments[3]), self._file, head)
            else:
                self._error(404, None, "no such route")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _maybe_stall(self, raw_path: str) -> bool:
        when = self.hub._stall
        if when is None or not when(self.command, raw_path, self._file):
            return False
        self._note(0)
        self._wait_until_client_leaves(raw_path)
        return True

    def _wait_until_client_leaves(self, raw_path: str) -> None:
        """Say nothing; return when the client closes the connection (noted) or the hub stops."""
        self.close_connection = True
        sock = self.connection
        while not self.hub._stopping.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    data = b""
                if not data:
                    with self.hub._lock:
                        self.hub.hangups.append(raw_path)
                    return
                sock.recv(65536)  # the client sent more; keep ignoring it

    def _note(self, status: int) -> None:
        method, path, query = self._seen_args
        self.hub._record(Seen(method, path, query, self._file, self.headers.get("Range"),
                              self.headers.get("Authorization"), status))

    # --- responses -------------------------------------------------------------------------------

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        self._note(status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, extra: dict | None = None,
               head: bool = False) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        headers.update(extra or {})
        self._send(status, headers, json.dumps({"error": message}).encode(), head=head)

    def _json(self, data) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(data).encode())

    def _repo(self, repo_id: str, head: bool = False) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        return repo

    # --- /api/models ------------------------------------------------------------------------------

    def _api(self, rest: list[str], query: str) -> None:
        repo = self._repo("/".join(rest[:2]))
        if repo is None:
            return
        tail = rest[2:]
        if not tail or tail[0] == "revision":
            revision = unquote(tail[1]) if len(tail) > 1 else "main"
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            self._json({
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
            })
        elif tail[0] == "tree" and len(tail) >= 2:
            revision = unquote(tail[1])
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            under = unquote("/".join(tail[2:]))
            recursive = parse_qs(query).get("recursive", ["false"])[0].lower() == "true"
            self._json(self._tree(repo.commits[sha], under, recursive))
        else:
            self._error(404, None, "no such route")

    def _tree(self, files: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        entries: list[dict] = []
        dirs: set[str] = set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                dirs.add(prefix + "/".join(parts[:depth]))
            if not recursive and len(parts) > 1:
                continue
            data = files[path]
            size = max(1, len(data) // 100) if self.hub.understate_sizes else len(data)
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": size, "path": path}
            if is_lfs(path, data):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
            entries.append(entry)
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + entries

    # --- /{repo}/resolve/{rev}/{path} ---------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        if repo.gated and not self._authorised():
            auth = self.headers.get("Authorization")
            status, message = (
                (401, (f"Access to model {repo_id} is restricted. You must have access to it and be "
                       "authenticated to access it. Please log in."))
                if not auth else
                (403, f"Access to model {repo_id} is restricted and you are not in the authorized list.")
            )
            self._error(status, "GatedRepo", message, head=head)
            return
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return
        files = repo.commits[sha]
        if path not in files:
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                        {"X-Repo-Commit": sha}, head=head)
            return
        data = files[path]
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if is_lfs(path, data):
            sha256 = hashlib.sha256(data).hexdigest()
            location = f"{self.hub.cdn}/cdn/{quote(repo_id)}/{sha256}"
            self._send(302, {
                **common,
                "Location": location,
                "ETag": f'"{git_blob_sha1(data)}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
            }, head=head)
            return
        self._body(path, data, {**common, "ETag": f'"{git_blob_sha1(data)}"',
                                "Content-Type": "application/octet-stream"}, head)

    def _authorised(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.hub.tokens

    # --- /cdn/{org}/{name}/{sha256}: the LFS storage the Hub redirects to ----------------------------

    def _cdn(self, repo_id: str, sha256: str, head: bool) -> None:
        repo = self.hub.repos.get(unquote(repo_id))
        found = repo.blob(sha256) if repo else None
        if found is None:
            self._error(404, None, "no such object", head=head)
            return
        path, data = found
        self._file = path
        self._body(path, data, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes",
                                "Content-Type": "application/octet-stream"}, head)

    def _body(self, path: str, data: bytes, headers: dict[str, str], head: bool) -> None:
        """200 with the whole file, or 206 for ``Range: bytes=N-[M]``; drops/stalls when told to."""
        total = len(data)
        range_header = self.headers.get("Range")
        status, start, end = 200, 0, total - 1
        if range_header:
            try:
                unit, spec = range_header.split("=", 1)
                first, _, last = spec.partition("-")
                start = int(first)
                end = int(last) if last else total - 1
                if unit.strip() != "bytes" or start > end or start >= total:
                    raise ValueError(range_header)
            except ValueError:
                self._send(416, {"Content-Range": f"bytes */{total}"}, head=head)
                return
            end = min(end, total - 1)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        body = data[start:end + 1]
        if head or status != 200 or path not in (self.hub._drop_once | self.hub._stall_body):
            self._send(status, headers, body, head=head)
            return
        # Misbehave: promise the whole body, send half of it.
        self._note(status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.hub._cut_at.get(path)
        self.wfile.write(body[: cut if cut is not None else len(body) // 2])
        self.wfile.flush()
        if path in self.hub._drop_once:
            self.hub._drop_once.discard(path)
            with self.hub._lock:
                self.hub.dropped.append(path)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._wait_until_client_leaves(self._seen_args[1])


# --- a tiny checkpoint --------------------------------------------------------------------------


def safetensors_bytes(tensors: dict[str, tuple[int, ...]], fill: int = 0) -> bytes:
    """A valid safetensors file of float32 tensors with the given shapes (raw format: an 8-byte
    little-endian header length, a JSON header, then the data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    pattern = bytes((fill + i) % 251 for i in range(251))
    data = (pattern * (offset // 251 + 1))[:offset]
    return struct.pack("<Q", len(raw)) + raw + data


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "vocab_size": 32,
    "torch_dtype": "float32",
}


def tiny_repo_files(weights_kb: int = 4) -> dict[str, bytes]:
    """org/tiny: a small Llama with what serving needs, plus what fetch must skip (a .bin copy of
    the weights, an ``original/`` folder, docs) and remote code (taken only with trust_remote_code)."""
    floats = max(1, weights_kb * 1024 // 4 // 16)
    weights = safetensors_bytes({"model.embed_tokens.weight": (floats, 16)})
    return {
        "config.json": json.dumps(TINY_CONFIG, indent=2).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}).encode(),
        "tokenizer_config.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
        "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
        "tokenizer.model": b"\x0a\x05<unk>" + bytes(range(64)),
        "merges.txt": b"#version: 0.2\nh e\n",
        "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "model.safetensors": weights,
        "pytorch_model.bin": b"PK\x03\x04" + bytes(512),
        "original/consolidated.00.pth": bytes(256),
        "original/params.json": b'{"dim": 16}',
        "modeling_tiny.py": b"# remote code\n",
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }
