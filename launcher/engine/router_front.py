"""The router's front: ``python -m launcher.engine.router_front /dev/stdin`` (its spec on its stdin).

Started and supervised by ``launch proxy start`` and ``launch serve --replicas`` with the default
router (``launcher.scaleout.router``): vllm-router listens on a loopback port of its own, and this
process on the public host and port. vllm-router retries a failed request on another replica and
routes by load, but it has no client keys and its control plane (``/add_worker``, ``/remove_worker``)
shares the port of the OpenAI API. So the front:

- forwards ``/v1/*`` to vllm-router as it is, streams included (chunk by chunk), with the client's
  ``Authorization`` header (vllm-router passes it on to the replica, which checks it too); with API keys
  a request without one of them is answered 401 here;
- answers ``/health`` (open, as lmdeploy's): 200 while vllm-router answers its ``/liveness``, once the
  placeholders are gone: vllm-router's power_of_two policy refuses to start with fewer than two workers, so
  it starts on two placeholders whose ``/health`` this process answers on loopback ports, and this process
  removes them (``/remove_worker``) as soon as vllm-router is up, before it answers a client;
- speaks lmdeploy's node API, so that ``launch proxy add/remove/status``, ``serve --proxy-url`` and
  ``serve --replicas`` work with either router: ``GET /nodes/status``, ``POST /nodes/add``
  (``{"url", "status": {"models": [...]}}``), ``POST /nodes/remove`` (``{"url"}``), translated to
  vllm-router's ``/list_workers``, ``/get_loads``, ``/add_worker`` and ``/remove_worker``; ``GET /router``
  says which router runs. The control plane is never open to clients: with API keys it needs one of them;
  without keys it answers only this machine (a loopback peer).

Every request to vllm-router has a deadline (``request_timeout_s``; 30 s for the control plane).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import sys
from typing import Any

from launcher.runtime.paths import read_spec

HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
CONTROL_TIMEOUT_S = 30.0
MAX_BODY = 512 * 1024 * 1024  # vllm-router's own default payload limit


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status)


def _bearer(header: str | None) -> str | None:
    if not header or not header.lower().startswith("bearer "):
        return None
    return header[7:].strip()


def _worker_path(path: str, url: str) -> str:
    """vllm-router's control path for one worker: ``PATH?url=URL``, the URL quoted whole."""
    from urllib.parse import quote

    return f"{path}?url={quote(url, safe='')}"


class Front:
    def __init__(self, data: dict) -> None:
        self.router = str(data["router_url"]).rstrip("/")
        self.keys = [str(k) for k in data.get("api_keys") or []]
        self.router_name = str(data.get("router", "vllm-router"))
        self.request_timeout_s = float(data.get("request_timeout_s", 1800.0))
        self.models: dict[str, list[str]] = {}  # node URL -> the models it registered with
        self.placeholders = [str(u) for u in data.get("placeholders") or []]
        self.ready = not self.placeholders
        self.ready_event = None  # set once the placeholders are gone (made in the app's loop)
        self.session = None

    # -- access ----------------------------------------------------------------------------------
    def client_allowed(self, request) -> bool:
        if not self.keys:
            return True
        given = _bearer(request.headers.get("Authorization"))
        return given is not None and any(hmac.compare_digest(given.encode(), k.encode()) for k in self.keys)

    def control_allowed(self, request) -> bool:
        if self.keys:
            return self.client_allowed(request)
        try:
            return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
        except ValueError:
            return False

    def control_refusal(self):
        if self.keys:
            return _error(401, "the router's node API needs one of its API keys (Authorization: Bearer KEY)")
        return _error(403, "the router's node API answers only this machine; start the router with an API key "
                           "(launch proxy start --api-key ...) to add nodes from other machines")

    # -- the OpenAI API --------------------------------------------------------------------------
    async def forward(self, request):
        from aiohttp import ClientError, ClientTimeout, web

        if not self.client_allowed(request):
            return _error(401, "invalid or missing API key")
        if not await self.wait_ready():
            return _error(503, "the router is still starting")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            upstream = await self.session.request(
                request.method, self.router + request.path_qs, data=body, headers=headers,
                timeout=ClientTimeout(total=self.request_timeout_s))
        except (ClientError, asyncio.TimeoutError) as err:
            return _error(502, f"the router does not answer ({type(err).__name__})")
        async with upstream:
            reply = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
            await reply.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await reply.write(chunk)
            except (ClientError, asyncio.TimeoutError):
                return reply  # the stream broke upstream: what was sent stays sent
            await reply.write_eof()
            return reply

    async def health(self, _request):
        from aiohttp import web

        status = await self._router_status("/liveness")
        if status == 200 and self.ready:
            return web.json_response({"status": "healthy", "router": self.router_name})
        return web.json_response({"status": "router not answering", "router": self.router_name}, status=503)

    # -- the node API (lmdeploy's shape) --------------------------------------------------------
    async def _router_call(self, method: str, path: str) -> tuple[int, Any]:
        from aiohttp import ClientTimeout

        async with self.session.request(method, self.router + path,
                                        timeout=ClientTimeout(total=CONTROL_TIMEOUT_S)) as reply:
            text = await reply.text()
            try:
                return reply.status, json.loads(text)
            except ValueError:
                return reply.status, text

    async def _router_status(self, path: str) -> int | None:
        from aiohttp import ClientError

        try:
            status, _ = await self._router_call("GET", path)
        except (ClientError, asyncio.TimeoutError):
            return None
        return status

    async def nodes_status(self, request):
        from aiohttp import ClientError, web

        if not self.control_allowed(request):
            return self.control_refusal()
        if not await self.wait_ready():
            return _error(503, "the router is still starting")
        try:
            _, listed = await self._router_call("GET", "/list_workers")
            _, loads = await self._router_call("GET", "/get_loads")
        except (ClientError, asyncio.TimeoutError) as err:
            return _error(502, f"the router does not answer ({type(err).__name__})")
        urls = listed.get("urls", []) if isinstance(listed, dict) else []
        load = {w.get("worker"): w.get("load") for w in (loads or {}).get("workers", []) if isinstance(w, dict)} \
            if isinstance(loads, dict) else {}
        # vllm-router asks each replica for its load; lmdeploy's api_server has no such endpoint (-1): unknown
        return web.json_response({
            url: {"models": self.models.get(url, []),
                  "unfinished": value if isinstance(value := load.get(url), int) and value >= 0 else None}
            for url in urls if isinstance(url, str)})

    async def nodes_add(self, request):
        from aiohttp import web

        if not self.control_allowed(request):
            return self.control_refusal()
        data = await self._json(request)
        url = data.get("url") if isinstance(data, dict) else None
        status = data.get("status") if isinstance(data, dict) else None
        models = status.get("models") if isinstance(status, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or not isinstance(models, list) \
                or not all(isinstance(m, str) for m in models):
            return web.json_response("Failed to add: give {\"url\": \"http://HOST:PORT\", \"status\": {\"models\": "
                                     "[names]}}")
        if not await self.wait_ready():
            return web.json_response("Failed to add: the router is still starting; try again in a moment")
        if url in self.models:  # known: the models are refreshed, the router keeps its counts
            self.models[url] = list(models)
            return web.json_response("Added successfully")
        failed = await self._change_worker("/add_worker", url, "Failed to add")
        if failed is None:
            self.models[url] = list(models)
        return web.json_response(failed or "Added successfully")

    async def nodes_remove(self, request):
        from aiohttp import web

        if not self.control_allowed(request):
            return self.control_refusal()
        data = await self._json(request)
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str):
            return web.json_response("Failed to delete: give {\"url\": \"http://HOST:PORT\"}")
        failed = await self._change_worker("/remove_worker", url, "Failed to delete")
        if failed is None:
            self.models.pop(url, None)
        return web.json_response(failed or "Deleted successfully")

    async def _change_worker(self, path: str, url: str, failed: str) -> str | None:
        """``POST PATH?url=URL`` to vllm-router (``/add_worker``, ``/remove_worker``): None once it took the
        change, else lmdeploy's answer of a failure, ``FAILED: why``."""
        from aiohttp import ClientError

        try:
            code, answer = await self._router_call("POST", _worker_path(path, url))
        except (ClientError, asyncio.TimeoutError) as err:
            return f"{failed}: the router does not answer ({type(err).__name__})"
        if code != 200:
            return f"{failed}: the router answered HTTP {code}: {str(answer)[:200]}"
        return None

    async def which(self, request):
        from aiohttp import web

        if not self.control_allowed(request):
            return self.control_refusal()
        return web.json_response({"router": self.router_name, "front": "launch"})

    async def wait_ready(self) -> bool:
        """Whether the placeholders are gone, waiting for it up to ``CONTROL_TIMEOUT_S`` (a request that came
        in the first moment after the start waits instead of being refused)."""
        if self.ready:
            return True
        try:
            await asyncio.wait_for(self.ready_event.wait(), CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False
        return True

    async def drop_placeholders(self) -> None:
        """Once vllm-router answers, take the placeholders out (until then a request is answered 503)."""
        from aiohttp import ClientError

        while not self.ready:
            try:
                if await self._router_status("/liveness") == 200:
                    for url in self.placeholders:
                        await self._router_call("POST", _worker_path("/remove_worker", url))
                    _, listed = await self._router_call("GET", "/list_workers")
                    urls = listed.get("urls", []) if isinstance(listed, dict) else []
                    self.ready = not set(urls) & set(self.placeholders)
            except (ClientError, asyncio.TimeoutError):
                pass
            if not self.ready:
                await asyncio.sleep(0.2)
        self.ready_event.set()

    @staticmethod
    async def _json(request) -> Any:
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError):
            return None

    # -- the app ---------------------------------------------------------------------------------
    def app(self):
        from aiohttp import ClientSession, TCPConnector, web

        runners = []

        async def start(_app) -> None:
            self.session = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
            self.ready_event = asyncio.Event()
            if self.ready:
                self.ready_event.set()
            for url in self.placeholders:  # answer their /health until vllm-router has let them go
                stand = web.Application()
                stand.router.add_get("/health", lambda _r: web.json_response({"status": "placeholder"}))
                runner = web.AppRunner(stand, access_log=None)
                await runner.setup()
                host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
                await web.TCPSite(runner, host, int(port)).start()
                runners.append(runner)
            if self.placeholders:
                _app["drop"] = asyncio.get_running_loop().create_task(self.drop_placeholders())

        async def stop(_app) -> None:
            for runner in runners:
                await runner.cleanup()
            await self.session.close()

        app = web.Application(client_max_size=MAX_BODY)
        app.on_startup.append(start)
        app.on_cleanup.append(stop)
        app.router.add_get("/health", self.health)
        app.router.add_get("/nodes/status", self.nodes_status)
        app.router.add_post("/nodes/add", self.nodes_add)
        app.router.add_post("/nodes/remove", self.nodes_remove)
        app.router.add_get("/router", self.which)
        app.router.add_route("*", "/v1/{tail:.*}", self.forward)
        return app


def main(argv: list[str] | None = None) -> int:
    data = read_spec(argv, "launcher.engine.router_front")
    if data is None:
        return 2
    from aiohttp import web

    front = Front(data)
    host, port = str(data["server_name"]), int(data["server_port"])
    print(f"launch router_front: {host}:{port} in front of {front.router_name} at {front.router}, API keys "
          f"{'on' if front.keys else 'off'}", file=sys.stderr, flush=True)
    web.run_app(front.app(), host=host, port=port, print=None, access_log=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
