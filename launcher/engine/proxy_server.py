"""The proxy process: ``python -m launcher.engine.proxy_server /dev/stdin`` (its spec on its stdin).

Started and supervised by ``launch proxy start``. Runs lmdeploy's own proxy
(``lmdeploy.serve.proxy.proxy.proxy``, what ``lmdeploy serve proxy`` calls) in this process, with:

- the API keys read from its spec, which launch writes into a pipe to its stdin: never on the
  command line (``ps`` shows that), never in a file (nothing holds them once it stops);
- the cache-status file disabled: by default lmdeploy writes its node list into its own
  installation (``site-packages/lmdeploy/serve/proxy/proxy_config.json``) and loads it back at the
  next start. It loads that file when its module is imported, before any flag is read, so a node
  list left there by another run is dropped here too: a proxy launch starts has no nodes.
"""

from __future__ import annotations

import sys

from launcher.runtime.paths import read_spec


def proxy_kwargs(data: dict) -> dict:
    """Keyword arguments of ``lmdeploy.serve.proxy.proxy.proxy`` for a spec. ``api_keys`` is a
    list or None: lmdeploy iterates a string character by character."""
    keys = [str(k) for k in data.get("api_keys") or []]
    return {
        "server_name": data["server_name"],
        "server_port": int(data["server_port"]),
        "routing_strategy": data["routing_strategy"],
        "api_keys": keys or None,
        "disable_cache_status": True,
        "log_level": "INFO",
    }


def main(argv: list[str] | None = None) -> int:
    data = read_spec(argv, "launcher.engine.proxy_server")
    if data is None:
        return 2
    kwargs = proxy_kwargs(data)
    from lmdeploy.serve.proxy.proxy import node_manager, proxy

    dropped = sorted(node_manager.nodes)
    node_manager.nodes.clear()
    node_manager.cache_status = False
    print(
        f"launch proxy_server: lmdeploy proxy on {kwargs['server_name']}:{kwargs['server_port']}, routing "
        f"{kwargs['routing_strategy']}, API keys {'on' if kwargs['api_keys'] else 'off'}, cache-status file off"
        + (f"; dropped {len(dropped)} node(s) lmdeploy loaded from its cache file" if dropped else ""),
        file=sys.stderr,
        flush=True,
    )
    proxy(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
