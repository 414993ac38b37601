"""lmdeploy's proxy as launch runs it: the routing strategies it takes and its command line."""

from __future__ import annotations

from launcher.errors import LaunchError


class RoutingRefused(LaunchError):
    """A routing strategy of lmdeploy's proxy that launch will not run."""

    value: str
    choices: tuple[str, ...]
    exit_code = 2

    def message(self) -> str:
        if self.value == "min_observed_latency":
            return (
                "--routing min_observed_latency is refused: lmdeploy 0.18's proxy counts a node without "
                "finished requests as infinitely slow, so it sends every request to the first registered "
                f"node. Use one of: {', '.join(self.choices)} (min_expected_latency: the fewest requests in "
                "flight, so faster nodes get more; random: uniform, whatever the load)."
            )
        return f"--routing {self.value!r} is not a routing strategy; choose one of: {', '.join(self.choices)}."


# lmdeploy's, less min_observed_latency (it starves). What they do (serve/proxy/proxy.py,
# NodeManager.get_node_url; launch registers nodes without a speed, so all count as equally fast):
# min_expected_latency sends each request to the node with the fewest requests in flight (ties at
# random), so a faster node, done sooner, gets more; random picks a node uniformly at random,
# whatever its load or speed.
ROUTINGS = ("min_expected_latency", "random")
DEFAULT_ROUTING = "min_expected_latency"


def check_routing(value: str) -> str:
    """``value`` if launch runs the proxy with it; ``min_observed_latency`` is refused (lmdeploy
    0.18 then sends everything to the first registered node)."""
    text = (value or "").strip()
    if text not in ROUTINGS:
        raise RoutingRefused(text, ROUTINGS)
    return text


def proxy_command(host: str, port: int, routing: str) -> list[str]:
    """The ``lmdeploy serve proxy`` command line equivalent to what launch runs (keys left out)."""
    return ["lmdeploy", "serve", "proxy", "--server-name", host, "--server-port", str(port),
            "--routing-strategy", routing, "--disable-cache-status", "--log-level", "INFO"]
