"""`launch proxy start | add | remove | status`: lmdeploy's proxy in front of several replicas."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.cli.options import (
    ApiKeyFileOpt,
    JsonOpt,
    ProxyPortOpt,
    RouterOpt,
    RoutingOpt,
    StartTimeoutOpt,
    api_keys_option,
)
from launcher.scaleout.proxy import DEFAULT_PROXY_PORT, DEFAULT_START_TIMEOUT_S

proxy_app = typer.Typer(
    name="proxy",
    help=(
        "A router in front of several `launch serve` replicas (vllm-router behind launch's front, or lmdeploy's "
        "proxy), run and watched by launch.\n\n"
        "Example: launch proxy start --port 8000, then on each replica's box: launch proxy add "
        "http://10.0.0.5:23333 --proxy http://PROXY:8000"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(proxy_app, name="proxy")

ProxyOpt = Annotated[
    str, typer.Option("--proxy", help="The proxy's address, e.g. http://127.0.0.1:8000.", show_default=False)
]
NodeArg = Annotated[str, typer.Argument(help="The replica's address, e.g. http://10.0.0.5:23333.", show_default=False)]
ApiKeysOpt = api_keys_option("API key clients must send (repeat for several). Also LAUNCH_API_KEYS=k1,k2.")


@proxy_app.command(
    epilog="Examples:  launch proxy start   |   launch proxy start --host 0.0.0.0 --port 8000 --api-key $KEY"
)
def start(
    host: Annotated[str, typer.Option("--host", help="Address to bind. Only this machine by default.")] = "127.0.0.1",
    port: ProxyPortOpt = DEFAULT_PROXY_PORT,
    api_key: ApiKeysOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    routing: RoutingOpt = None,
    router: RouterOpt = None,
    start_timeout: StartTimeoutOpt = DEFAULT_START_TIMEOUT_S,
) -> None:
    """Run the router in front of replicas, supervised; Ctrl-C stops it all.

    The default, vllm-router behind launch's front, retries a failed request on another replica, routes
    by load and checks every replica's /health every 2 s; its node API takes an API key, or answers this
    machine only. --router lmdeploy runs lmdeploy's proxy with launch's watchdog, which takes a node that
    stops answering /health out within seconds and adds it back when it answers.
    """
    from launcher.engine.routing import DEFAULT_ROUTING
    from launcher.scaleout.proxy import ProxyRequest, run_proxy

    raise typer.Exit(run_proxy(ProxyRequest(host=host, port=port, api_keys=tuple(api_key or ()),
                                            api_key_file=api_key_file,
                                            routing=DEFAULT_ROUTING if routing is None else routing,
                                            router=router, start_timeout_s=start_timeout)))


@proxy_app.command(
    epilog="Examples:  launch proxy add http://10.0.0.5:23333 --proxy http://10.0.0.1:8000 --api-key $KEY"
)
def add(
    url: NodeArg,
    proxy: ProxyOpt,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="The replica's API key, to read its model names; it is sent to the router's "
                     "node API too (use the same keys on both). Also LAUNCH_API_KEY.",
                     show_default=False),
    ] = None,
) -> None:
    """Register a replica with the proxy, once its /health answers, with the models it serves."""
    from launcher.net import http
    from launcher.scaleout.nodes import add_node

    node, new = add_node(url, proxy, api_key or os.environ.get("LAUNCH_API_KEY") or None)
    shown = http.redact(node.url)
    print(f"added {shown} ({', '.join(node.models)})" if new
          else f"already registered as {shown} ({', '.join(node.models)}): not added twice")


KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", help="An API key of the router, for its node API (a router started with keys asks "
                 "for one). Also LAUNCH_API_KEY.", show_default=False),
]


@proxy_app.command(epilog="Example:  launch proxy remove http://10.0.0.5:23333 --proxy http://10.0.0.1:8000")
def remove(url: NodeArg, proxy: ProxyOpt, api_key: KeyOpt = None) -> None:
    """Take a replica out of the proxy (the replica keeps running)."""
    from launcher.net import http
    from launcher.scaleout.nodes import remove_node

    node = remove_node(url, proxy, api_key or os.environ.get("LAUNCH_API_KEY") or None)
    print(f"removed {http.redact(node.url)}")


@proxy_app.command(epilog="Examples:  launch proxy status --proxy http://127.0.0.1:8000   |   ... --json")
def status(proxy: ProxyOpt, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """The proxy's nodes, their models and their /health now; and the nodes launch's watchdog took
    out (when and why), for a proxy that `launch proxy start` or `serve --replicas` runs here."""
    from launcher.scaleout.status import render_status, status_json, status_report

    report = status_report(proxy, key=api_key or os.environ.get("LAUNCH_API_KEY") or None)
    if as_json:
        print(json.dumps(status_json(proxy, report.rows, report.removed, report.router), indent=2))
    else:
        print(render_status(proxy, report.rows, report.removed, report.router))
