"""Scale-out layouts, as pure functions: N replicas of one engine on one machine, or one engine
across N nodes (TurboMind tensor parallel over nodes).

Replicas: replica i gets its own ``tp`` GPUs (``CUDA_VISIBLE_DEVICES``, disjoint sets taken in
order from the GPUs this process sees) and its own loopback port; lmdeploy's proxy sits in front.
Refused when ``replicas x tp`` exceeds the visible GPUs.

Nodes: every node runs the same ``lmdeploy serve api_server`` command with the TOTAL ``--tp`` and
``--nnodes N --node-rank R --dist-init-addr HOST:PORT`` (rank 0 hosts the rendezvous and serves
HTTP); each node uses its local GPUs ``0 .. tp/N - 1``.

Both are checked the way TurboMind checks them before it loads a weight: the parallel layout with
lmdeploy's own ``lmdeploy.turbomind.parallel_config.derive_parallel_config`` (a pure-stdlib module,
loaded from the installed lmdeploy by file so that ``plan`` imports neither lmdeploy's package nor
torch), and the model's head counts: attention heads and hidden size must divide by tp (TurboMind
splits them evenly); KV heads fewer than, or not divisible by, tp are repeated up to a multiple of
tp (so each GPU holds ``ceil(kv_heads / tp)``). The commands come from ``engine.api_server_argv``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from launcher.engine.parallel import check_parallel
from launcher.engine.routing import DEFAULT_ROUTING, check_routing
from launcher.engine.spec import EngineSpec, api_server_argv
from launcher.errors import LaunchError
from launcher.rules import checks, limits
from launcher.rules.capacity import Capacity
from launcher.rules.checks import BadOption
from launcher.rules.kvcache import tp_split
from launcher.runtime.gpu import CUDA_ENV, Visible


class LayoutNeedsMoreGpus(LaunchError):
    replicas: int
    tp: int
    gpus: int

    def message(self) -> str:
        return (f"--replicas {self.replicas} x --tp {self.tp} needs {self.replicas * self.tp} GPUs, but "
                f"{self.gpus} are visible here (CUDA_VISIBLE_DEVICES counts). Use fewer --replicas or a "
                "smaller --tp.")


REPLICA_HOST = "127.0.0.1"  # replicas listen on loopback; only the proxy is public


# --- replicas on one machine -------------------------------------------------------------------


def visible_devices(gpu_count: int | None, environ: Mapping[str, str] | None = None) -> Visible:
    """The GPUs CUDA uses here (``launcher.runtime.gpu.visible``, the one reader of ``CUDA_VISIBLE_DEVICES``):
    indices or UUIDs, or ``0 .. gpu_count-1`` when it is unset; ``ids`` None when neither is known
    (planning without a GPU)."""
    from launcher.runtime.gpu import visible

    return visible(environ, gpu_count)


@dataclass(frozen=True)
class Replica:
    index: int
    devices: tuple[str, ...]
    host: str
    port: int
    argv: tuple[str, ...]

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ReplicaLayout:
    tp: int
    replicas: tuple[Replica, ...]
    capacity: Capacity  # full-length sessions at once: per replica (memory and max_batch_size), in all
    kv_heads_per_gpu: int
    devices_assumed: bool  # no GPU seen here: GPUs 0.. assumed
    session_len: int | None = None  # each replica's
    routing: str = DEFAULT_ROUTING  # the proxy's in front
    devices_note: str | None = None  # CUDA_VISIBLE_DEVICES entries CUDA ignores (gpu.Visible.note)

    @property
    def sessions_per_replica(self) -> int | None:
        return self.capacity.per_engine

    @property
    def total_sessions(self) -> int | None:
        return self.capacity.total


def replica_layout(
    engine: EngineSpec,
    model_path: str,
    section: Mapping,
    *,
    replicas: int,
    devices: Visible | Sequence[str] | None,
    first_port: int,
    sessions_per_replica: int | None = None,
    routing: str | None = None,
) -> ReplicaLayout:
    """``replicas`` copies of ``engine`` (its tp, session_len and the rest) on one machine: replica
    i gets GPUs ``devices[i*tp : (i+1)*tp]`` and port ``first_port + i`` on loopback.
    ``sessions_per_replica``: full-length sessions one replica's KV cache holds (the capacity caps
    it at the engine's max_batch_size). ``routing``: the proxy's (checked; default its default).

    ``devices``: ``visible_devices(...)`` (or its ids); ``None`` (no GPU seen) assumes ``0 .. replicas*tp-1``.
    ``section``: the config section with the head counts. Raises ``LayoutNeedsMoreGpus``,
    ``LayoutRefused``, ``LayoutHeadsIndivisible``, ``BadOption``."""
    tp = engine.config.tp
    checks.whole("--replicas", replicas, 1, limits.REPLICAS.high)
    routing = DEFAULT_ROUTING if routing is None else check_routing(routing)
    kv = tp_split(section, tp)
    if engine.backend == "turbomind":
        check_parallel(tp, gpus_per_node=tp)
    seen = devices if isinstance(devices, Visible) else Visible(None, None if devices is None else tuple(devices))
    assumed = seen.ids is None
    pool = tuple(str(i) for i in range(replicas * tp)) if seen.ids is None else seen.ids
    if replicas * tp > len(pool):
        if seen.note():
            raise BadOption(CUDA_ENV, str(seen.value), f"{seen.note()}; --replicas {replicas} x --tp {tp} needs "
                            f"{replicas * tp} GPUs: list them, comma-separated (e.g. 0,1,2,3)")
        raise LayoutNeedsMoreGpus(replicas, tp, len(pool))
    if isinstance(first_port, bool) or not isinstance(first_port, int) or first_port < 1 \
            or first_port + replicas - 1 > 65535:
        raise BadOption("--port", str(first_port), f"leaves no room for {replicas} replica ports up to 65535")
    out = []
    for i in range(replicas):
        spec = replace(engine, host=REPLICA_HOST, port=first_port + i)
        out.append(Replica(i, pool[i * tp:(i + 1) * tp], REPLICA_HOST, first_port + i,
                           tuple(api_server_argv(model_path, spec))))
    capacity = Capacity(sessions_per_replica, engine.config.max_batch_size, replicas)
    return ReplicaLayout(tp, tuple(out), capacity, kv, assumed, engine.config.session_len, routing, seen.note())


# --- one engine across nodes -------------------------------------------------------------------


def parse_dist_init_addr(value: str) -> tuple[str, int]:
    """``HOST:PORT`` of node 0's rendezvous, as TurboMind splits it (one ``:``; no IPv6 literal);
    the host by the one host rule (``address.check_host``), the port by the one port rule."""
    from launcher.runtime.address import check_host, is_wildcard, validate_port

    text = (value or "").strip()
    host, sep, port = text.partition(":")
    advice = ("give node 0's address and a free port, HOST:PORT, e.g. 10.0.0.1:29500 (TurboMind splits it at its "
              "one ':')")
    try:
        number = validate_port(port) if sep and host and ":" not in port else None
        host = check_host(host, "--dist-init-addr", advice) if number is not None else host
    except BadOption:
        number = None
    if number is None:
        raise BadOption("--dist-init-addr", value, advice)
    if host == "*" or is_wildcard(host):
        raise BadOption("--dist-init-addr", value, "the other nodes connect there: give node 0's real address")
    return host, number


@dataclass(frozen=True)
class NodeCommand:
    rank: int
    argv: tuple[str, ...]

    @property
    def serves_http(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class NodeLayout:
    tp: int
    nnodes: int
    gpus_per_node: int
    dist_init_addr: str
    host: str  # where rank 0 serves HTTP
    port: int
    nodes: tuple[NodeCommand, ...]
    capacity: Capacity  # of the one engine
    kv_heads_per_gpu: int
    session_len: int | None = None

    @property
    def total_sessions(self) -> int | None:
        return self.capacity.total


def node_layout(
    engine: EngineSpec,
    model_path: str,
    section: Mapping,
    *,
    nnodes: int,
    dist_init_addr: str,
    sessions: int | None = None,
) -> NodeLayout:
    """One engine with ``engine``'s TOTAL tp over ``nnodes`` nodes: the command of every rank.
    ``sessions``: full-length sessions of the KV plan made per GPU with that total tp (the capacity
    caps them at max_batch_size)."""
    tp = engine.config.tp
    checks.whole("--nnodes", nnodes, 1, limits.NNODES.high)
    if nnodes < 2:
        raise BadOption("--nnodes", str(nnodes), "one node needs no multi-node layout; give 2 or more")
    if engine.backend != "turbomind":
        raise BadOption("--nnodes", str(nnodes), "launch lays out TurboMind across nodes; lmdeploy's PyTorch "
                        "engine spans nodes through Ray (ray start on each node, then one api_server)")
    host, port = parse_dist_init_addr(dist_init_addr)
    kv = tp_split(section, tp)
    check = check_parallel(tp, nnodes=nnodes)
    addr = f"{host}:{port}"
    base = api_server_argv(model_path, engine)
    nodes = tuple(
        NodeCommand(rank, tuple(base + ["--nnodes", str(nnodes), "--node-rank", str(rank), "--dist-init-addr", addr]))
        for rank in range(nnodes)
    )
    return NodeLayout(tp, nnodes, check.gpus_per_node, addr, engine.host, engine.port, nodes,
                      Capacity(sessions, engine.config.max_batch_size), kv, engine.config.session_len)


# --- the scale-out flags ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """``--replicas`` / ``--nnodes --node-rank --dist-init-addr``, typed and consistent: at most one
    of the two layouts (1 and 1: one engine on one machine, no layout)."""

    replicas: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # serve: this node's rank; plan: all ranks are shown
    dist_init_addr: str | None = None
    routing: str | None = None  # the proxy's, with replicas (None: its default)

    @property
    def kind(self) -> str | None:
        return "replicas" if self.replicas > 1 else "nodes" if self.nnodes > 1 else None


def check_scale(replicas: object = 1, nnodes: object = 1, node_rank: object = None,
                dist_init_addr: str | None = None, *, routing: str | None = None, need_rank: bool = False) -> Scale:
    """The scale-out flags checked before any config is read (``BadOption`` in one line).
    ``need_rank``: serve runs one node and must be told which (two nodes at rank 0 would wait
    for each other forever). ``routing`` (``--routing``) picks among replicas behind the proxy
    ``--replicas`` runs: refused without replicas (it would do nothing), checked by its owner
    (``proxy_start.check_routing``)."""
    n_replicas = checks.whole("--replicas", replicas, 1, limits.REPLICAS.high, example=2)
    n_nodes = checks.whole("--nnodes", nnodes, 1, limits.NNODES.high, example=2)
    if n_replicas > 1 and n_nodes > 1:
        raise BadOption("--replicas", str(n_replicas), "replicas of a multi-node engine are not laid out by launch; "
                        "give --replicas (one machine) or --nnodes (one engine across nodes)")
    if routing is not None:
        if n_replicas < 2:
            raise BadOption("--routing", str(routing), "picks a replica behind the proxy that --replicas N (2 or "
                            "more) runs; without replicas there is no proxy (for your own, `launch proxy start "
                            "--routing`)")
        routing = check_routing(routing)
    if n_nodes == 1:
        for option, value in (("--node-rank", node_rank), ("--dist-init-addr", dist_init_addr)):
            if value is not None:
                raise BadOption(option, str(value), "is for one engine across nodes: give --nnodes N (2 or more) too")
        return Scale(replicas=n_replicas, routing=routing)
    if dist_init_addr is None:
        raise BadOption("--dist-init-addr", "", "one engine across nodes needs node 0's rendezvous address, "
                        "the same on every node, e.g. --dist-init-addr 10.0.0.1:29500")
    host, port = parse_dist_init_addr(dist_init_addr)
    rank = None
    if node_rank is not None:
        rank = checks.whole("--node-rank", node_rank, 0, n_nodes - 1, example=0)
    elif need_rank:
        raise BadOption("--node-rank", "", f"say which node this is, 0 to {n_nodes - 1} (0 serves HTTP), "
                        "e.g. --node-rank 0")
    return Scale(nnodes=n_nodes, node_rank=rank, dist_init_addr=f"{host}:{port}")


# --- from a plan ------------------------------------------------------------------------------


def _plan_parts(plan) -> tuple[str, Mapping, int | None]:
    section = plan.patched_config
    for key in plan.decision.section:
        section = section[key]
    from launcher.plan.build import OVERLAY_PLACEHOLDER

    sessions = plan.memory.sessions if plan.memory is not None else None
    return str(plan.overlay_path or OVERLAY_PLACEHOLDER), section, sessions


def replicas_for_plan(plan, replicas: int, *, first_port: int | None = None,
                      environ: Mapping[str, str] | None = None, gpu_count: int | None = None,
                      routing: str | None = None) -> ReplicaLayout:
    """``replica_layout`` for a ``launcher.plan.build.Plan`` (read only): its engine, overlay, config and
    KV plan; replicas on the ports after the plan's port (the proxy's, ``--port``) unless
    ``first_port`` says. ``gpu_count``: GPUs seen here when the plan did not count them."""
    model_path, section, sessions = _plan_parts(plan)
    count = plan.gpu_count if plan.gpu_count is not None else gpu_count
    if first_port is None:
        port = plan.engine.port
        checks.whole("--replicas", replicas, 1, limits.REPLICAS.high)
        if port + replicas > 65535:
            raise BadOption("--port", str(port), f"the {replicas} replicas listen on the ports after it ({port + 1} "
                            f"to {port + replicas}), past 65535: give --port {65535 - replicas} or lower")
        first_port = port + 1
    return replica_layout(plan.engine, model_path, section, replicas=replicas,
                          devices=visible_devices(count, environ), first_port=first_port,
                          sessions_per_replica=sessions, routing=routing)


def nodes_for_plan(plan, nnodes: int, dist_init_addr: str) -> NodeLayout:
    """``node_layout`` for a ``launcher.plan.build.Plan`` made with the TOTAL tp (its KV plan is per GPU)."""
    model_path, section, sessions = _plan_parts(plan)
    return node_layout(plan.engine, model_path, section, nnodes=nnodes, dist_init_addr=dist_init_addr,
                       sessions=sessions)


def layout_for_plan(plan, scale: Scale, *, first_port: int | None = None,
                    environ: Mapping[str, str] | None = None,
                    gpu_count: int | None = None) -> ReplicaLayout | NodeLayout | None:
    """The layout ``scale`` asks for, from a plan (``None`` for one engine on one machine).
    ``gpu_count``: GPUs seen here when the plan did not count them (``--gpu-memory`` given)."""
    if scale.kind == "replicas":
        return replicas_for_plan(plan, scale.replicas, first_port=first_port, environ=environ, gpu_count=gpu_count,
                                 routing=scale.routing)
    if scale.kind == "nodes":
        assert scale.dist_init_addr is not None
        return nodes_for_plan(plan, scale.nnodes, scale.dist_init_addr)
    return None


def plan_with_layout(request, *, replicas: object = 1, nnodes: object = 1, node_rank: object = None,
                     dist_init_addr: str | None = None, routing: str | None = None):
    """``launch plan``: every flag checked (the scale-out ones too) before the config is read, the
    plan (with the total tp across nodes), then its layout checked and laid out. Returns
    ``(plan, layout or None)``. Writes nothing."""
    from launcher.plan.build import build_plan
    from launcher.runtime.address import validate_host, validate_port

    scale = check_scale(replicas, nnodes, node_rank, dist_init_addr, routing=routing)
    request = replace(request, host=validate_host(request.host), port=validate_port(request.port),
                      nnodes=scale.nnodes)
    plan = build_plan(request)
    count = gpus_here() if scale.kind == "replicas" and plan.gpu_count is None else None
    return plan, layout_for_plan(plan, scale, gpu_count=count)


def gpus_here() -> int | None:
    """GPUs visible here (NVML, no heavy import), for a replica layout when the plan did not count
    them (``--gpu-memory`` given); ``None`` without a GPU."""
    from launcher.runtime.gpu import free_memory

    free = free_memory()
    return len(free) if free else None


# --- showing them ------------------------------------------------------------------------------


def replicas_json(layout: ReplicaLayout) -> list[dict]:
    return [
        {"index": r.index, "gpus": list(r.devices), "cuda_visible_devices": ",".join(r.devices), "host": r.host,
         "port": r.port, "url": r.url, "env": r.env, "command": list(r.argv), "command_line": shlex.join(r.argv),
         "session_len": layout.session_len, "sessions": layout.sessions_per_replica,
         "capacity_limit": layout.capacity.limit}
        for r in layout.replicas
    ]


def nodes_json(layout: NodeLayout) -> list[dict]:
    return [
        {"rank": n.rank, "gpus": [str(i) for i in range(layout.gpus_per_node)], "serves_http": n.serves_http,
         "port": layout.port if n.serves_http else None, "session_len": layout.session_len, "tp": layout.tp,
         "command": list(n.argv), "command_line": shlex.join(n.argv)}
        for n in layout.nodes
    ]


def render_replicas(layout: ReplicaLayout) -> str:
    lines = [f"replicas       {len(layout.replicas)} x tp {layout.tp}"
             + (" (GPU ids assumed: no GPU seen here)" if layout.devices_assumed else "")]
    if layout.devices_note:
        lines.append(f"  note: {layout.devices_note}")
    for r in layout.replicas:
        lines.append(f"  replica {r.index}  GPUs {','.join(r.devices):<12} {r.url}")
        lines.append(f"    CUDA_VISIBLE_DEVICES={','.join(r.devices)} {shlex.join(r.argv)}")
    lines.append(f"capacity       {layout.capacity.text('replica')}")
    return "\n".join(lines)


def render_nodes(layout: NodeLayout) -> str:
    lines = [(f"nodes          {layout.nnodes} x {layout.gpus_per_node} GPU(s), tp {layout.tp} in all, "
              f"rendezvous {layout.dist_init_addr}; rank 0 serves HTTP")]
    for n in layout.nodes:
        role = f"serves http://{layout.host}:{layout.port}" if n.serves_http else "engine only"
        lines.append(f"  node {n.rank} ({role}, local GPUs 0-{layout.gpus_per_node - 1}): {shlex.join(n.argv)}")
    lines.append(f"capacity       {layout.capacity.text()}")
    return "\n".join(lines)
