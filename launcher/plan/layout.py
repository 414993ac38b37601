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
torch); the model's head counts were checked by the plan (``kvcache.tp_split``), which hands over
the KV heads each GPU holds. The commands come from ``engine.api_server_argv``.

The flags they use come checked (``launcher.plan.request``: once, as they entered) and are not
checked here again; what is checked here is what only a layout knows (the GPUs it needs, the ports
after the proxy's, lmdeploy's parallel rules).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from launcher.engine.parallel import check_parallel
from launcher.engine.routing import DEFAULT_ROUTER, DEFAULT_ROUTING
from launcher.engine.spec import EngineSpec, api_server_argv
from launcher.errors import LaunchError
from launcher.plan.build import OVERLAY_PLACEHOLDER, Plan, build_plan
from launcher.plan.request import PlanRequest, check_request
from launcher.rules.capacity import Capacity
from launcher.rules.checks import BadOption
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
    (planning without a GPU). ``gpu_count`` counts the GPUs CUDA enumerates (``gpu.count``), not the
    machine's: with the variable set, CUDA enumerates its list up to the first entry it cannot use, so
    the first ``gpu_count`` entries are the GPUs (``4,5`` on an 8-GPU machine: two GPUs, 4 and 5)."""
    from launcher.runtime.gpu import Visible, visible

    seen = visible(environ)
    if seen.value is None:  # unset: every GPU, 0 .. gpu_count-1
        return visible(environ, gpu_count)
    if gpu_count is not None and seen.ids is not None and len(seen.ids) > gpu_count:
        return Visible(seen.value, seen.ids[:gpu_count], seen.ids[gpu_count])
    return seen


@dataclass(frozen=True)
class Replica:
    index: int
    devices: tuple[str, ...]
    engine: EngineSpec  # the plan's engine on this replica's loopback host and port: made once, here
    argv: tuple[str, ...]

    @property
    def host(self) -> str:
        return self.engine.host

    @property
    def port(self) -> int:
        return self.engine.port

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
    routing: str = DEFAULT_ROUTING  # lmdeploy's proxy's, with router "lmdeploy"
    router: str = DEFAULT_ROUTER  # in front: "vllm" (vllm-router behind launch's front) or "lmdeploy"
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
    kv_heads_per_gpu: int,
    *,
    replicas: int,
    devices: Visible | Sequence[str] | None,
    sessions_per_replica: int | None = None,
    routing: str | None = None,
    router: str | None = None,
    one_port: bool = False,
) -> ReplicaLayout:
    """``replicas`` copies of ``engine`` (its tp, session_len and the rest) on one machine: replica
    i gets GPUs ``devices[i*tp : (i+1)*tp]`` and port ``engine.port + 1 + i`` on loopback (the
    proxy takes ``engine.port``). ``sessions_per_replica``: full-length sessions one replica's KV
    cache holds (the capacity caps it at the engine's max_batch_size). ``routing``: the proxy's,
    checked (default its default). ``kv_heads_per_gpu``: the plan's (``kvcache.tp_split``).

    ``devices``: ``visible_devices(...)`` (or its ids); ``None`` (no GPU seen) assumes ``0 .. replicas*tp-1``.
    ``one_port``: each replica on a machine of its own (a Kubernetes pod), all on ``engine.port + 1``.
    Raises ``LayoutNeedsMoreGpus``, ``LayoutRefused``, ``BadOption`` (``CUDA_VISIBLE_DEVICES``; the
    replicas' ports past 65535)."""
    tp = engine.config.tp
    if engine.backend == "turbomind":
        check_parallel(tp, gpus_per_node=tp, cp=engine.config.cp)
    seen = devices if isinstance(devices, Visible) else Visible(None, None if devices is None else tuple(devices))
    assumed = seen.ids is None
    pool = tuple(str(i) for i in range(replicas * tp)) if seen.ids is None else seen.ids
    if replicas * tp > len(pool):
        if seen.note():
            raise BadOption(CUDA_ENV, str(seen.value), f"{seen.note()}; --replicas {replicas} x --tp {tp} needs "
                            f"{replicas * tp} GPUs: list them, comma-separated (e.g. 0,1,2,3)")
        raise LayoutNeedsMoreGpus(replicas, tp, len(pool))
    port, used = engine.port, 1 if one_port else replicas
    if port + used > 65535:
        where = "on the port after it" if one_port else "on the ports after it"
        span = f"{port + 1}" if used == 1 else f"{port + 1} to {port + used}"
        raise BadOption("--port", str(port), f"the {replicas} replicas listen {where} ({span}), past 65535: "
                        f"give --port {65535 - used} or lower")
    out = []
    for i in range(replicas):
        spec = replace(engine, host=REPLICA_HOST, port=port + 1 + (0 if one_port else i))
        out.append(Replica(i, pool[i * tp:(i + 1) * tp], spec, tuple(api_server_argv(model_path, spec))))
    capacity = Capacity(sessions_per_replica, engine.config.max_batch_size, replicas)
    return ReplicaLayout(tp, tuple(out), capacity, kv_heads_per_gpu, assumed, engine.config.session_len,
                         DEFAULT_ROUTING if routing is None else routing, DEFAULT_ROUTER if router is None else router,
                         seen.note())


# --- one engine across nodes -------------------------------------------------------------------


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
    kv_heads_per_gpu: int,
    *,
    nnodes: int,
    dist_init_addr: str,
    sessions: int | None = None,
) -> NodeLayout:
    """One engine with ``engine``'s TOTAL tp over ``nnodes`` nodes: the command of every rank.
    ``dist_init_addr``: checked (``request.parse_dist_init_addr``). ``sessions``: full-length
    sessions of the KV plan made per GPU with that total tp (the capacity caps them at
    max_batch_size). ``kv_heads_per_gpu``: the plan's (``kvcache.tp_split``)."""
    tp = engine.config.tp
    if nnodes < 2:
        raise BadOption("--nnodes", str(nnodes), "one node needs no multi-node layout; give 2 or more")
    if engine.backend != "turbomind":
        raise BadOption("--nnodes", str(nnodes), "launch lays out TurboMind across nodes; lmdeploy's PyTorch "
                        "engine spans nodes through Ray (ray start on each node, then one api_server)")
    check = check_parallel(tp, nnodes=nnodes, cp=engine.config.cp)
    base = api_server_argv(model_path, engine)
    nodes = tuple(
        NodeCommand(rank, tuple(base + ["--nnodes", str(nnodes), "--node-rank", str(rank), "--dist-init-addr",
                                        dist_init_addr]))
        for rank in range(nnodes)
    )
    return NodeLayout(tp, nnodes, check.gpus_per_node, dist_init_addr, engine.host, engine.port, nodes,
                      Capacity(sessions, engine.config.max_batch_size), kv_heads_per_gpu, engine.config.session_len)


# --- from a plan ------------------------------------------------------------------------------


def _plan_parts(plan: Plan) -> tuple[str, int | None]:
    sessions = plan.memory.sessions if plan.memory is not None else None
    return str(plan.overlay_path or OVERLAY_PLACEHOLDER), sessions


def replicas_for_plan(plan: Plan, replicas: int, *, environ: Mapping[str, str] | None = None,
                      routing: str | None = None, router: str | None = None, one_port: bool = False) -> ReplicaLayout:
    """``replica_layout`` for a plan (read only): its engine, overlay, KV heads and KV plan; the
    replicas on the ports after the plan's port (the proxy's, ``--port``), on the GPUs it counted."""
    model_path, sessions = _plan_parts(plan)
    return replica_layout(plan.engine, model_path, plan.kv_heads_per_gpu, replicas=replicas,
                          devices=visible_devices(plan.gpu_count, environ), sessions_per_replica=sessions, routing=routing,
                          router=router, one_port=one_port)


def nodes_for_plan(plan: Plan, nnodes: int, dist_init_addr: str) -> NodeLayout:
    """``node_layout`` for a plan made with the TOTAL tp (its KV plan is per GPU)."""
    model_path, sessions = _plan_parts(plan)
    return node_layout(plan.engine, model_path, plan.kv_heads_per_gpu, nnodes=nnodes, dist_init_addr=dist_init_addr,
                       sessions=sessions)


def layout_for_plan(plan: Plan, *, environ: Mapping[str, str] | None = None) -> ReplicaLayout | NodeLayout | None:
    """The layout the plan's (checked) request asks for (``None`` for one engine on one machine)."""
    request = plan.request
    if request.scale_out == "replicas":
        return replicas_for_plan(plan, request.replicas, environ=environ,
                                 routing=request.routing, router=request.router)
    if request.scale_out == "nodes":
        assert request.dist_init_addr is not None  # check_request: nodes need it
        return nodes_for_plan(plan, request.nnodes, request.dist_init_addr)
    return None


def plan_with_layout(request: PlanRequest) -> tuple[Plan, ReplicaLayout | NodeLayout | None]:
    """``launch plan``: every flag checked (the scale-out ones too) before the config is read, the
    plan (with the total tp across nodes), then its layout checked and laid out. Writes nothing."""
    plan = build_plan(check_request(request))
    return plan, layout_for_plan(plan)


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
