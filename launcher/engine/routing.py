"""The routers launch runs in front of replicas, and their command lines: vllm-router (the default: it
retries a failed request on another replica and routes by load) and lmdeploy's own proxy (``--router
lmdeploy``: its routing strategies, with launch's watchdog)."""

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


# --- which router --------------------------------------------------------------------------------

ROUTERS = ("vllm", "lmdeploy")
DEFAULT_ROUTER = "vllm"
VLLM_ROUTER = "vllm-router"  # its console script (the vllm-router package, pinned in pyproject.toml)
# Load-aware: of two replicas drawn at random, the one with fewer requests in flight (measured: 6 failed of
# 1,500 under the fault schedule, load spread ~1/3 each; sticky_least_loaded sent every request to one
# replica). power_of_two refuses to START with fewer than 2 workers, and replicas register after the router
# is up: it starts on two placeholders that launch's front serves and removes before it takes a request.
VLLM_POLICY = "power_of_two"
PLACEHOLDERS = 2
VLLM_TUNING = ("--health-check-interval-secs", "2", "--health-check-timeout-secs", "2",
               "--health-failure-threshold", "2", "--health-success-threshold", "1",
               "--cb-failure-threshold", "3", "--cb-success-threshold", "1",
               "--cb-timeout-duration-secs", "5", "--cb-window-duration-secs", "10")


class RouterRefused(LaunchError):
    value: str
    exit_code = 2

    def message(self) -> str:
        return (f"--router {self.value!r} is not a router launch runs; choose {ROUTERS[0]} (the default: retries a "
                f"failed request on another replica, routes by load) or {ROUTERS[1]} (lmdeploy's own proxy)")


def check_router(value: str | None) -> str:
    text = DEFAULT_ROUTER if value is None else (value or "").strip()
    if text not in ROUTERS:
        raise RouterRefused(text)
    return text


def placeholder_urls(first_port: int) -> list[str]:
    """The placeholders' URLs: loopback ports ``first_port`` .. (launch's front answers their /health)."""
    return [f"http://127.0.0.1:{first_port + i}" for i in range(PLACEHOLDERS)]


def vllm_router_command(port: int, metrics_port: int, request_timeout_s: float,
                        placeholder_port: int | str = "PORT+2") -> list[str]:
    """vllm-router on a loopback port of its own (launch's front takes the public host and port), its
    Prometheus metrics on another loopback port (its default, 29000 on every address, clashes with a second
    router on the machine), started on the placeholders (``placeholder_urls``) that power_of_two needs."""
    workers = (placeholder_urls(placeholder_port) if isinstance(placeholder_port, int)
               else [f"http://127.0.0.1:{placeholder_port}+{i}" for i in range(PLACEHOLDERS)])
    return [VLLM_ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", VLLM_POLICY,
            "--worker-urls", *workers, "--worker-startup-check-interval", "1",
            "--request-timeout-secs", str(max(1, round(request_timeout_s))), "--log-level", "warning",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), *VLLM_TUNING]
