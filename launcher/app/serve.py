"""`launch serve`: flags -> config -> plan -> checks -> fetch -> overlay -> supervised api_server.

Everything that can fail cheaply fails before anything slow: every flag first (before any request),
then from the config alone the RoPE rules, the KV-cache fit, the engine's availability and
architecture support, and the port, all before a weight is downloaded or loaded (``--dry-run`` makes
the same checks from the config and exits as serve would). The ports are claimed before anything is
written (``ports.PortClaim``); the serving process gets its spec, API keys included, through a
pipe. The plan is made once; after the download it is made again only when the downloaded config
differs from the one it was made from, and serve says so.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from launcher.app.joining import Joining, check_joining, join_hooks
from launcher.app.serveprobe import probe_hook
from launcher.engine.spec import (
    architecture_of,
    spec_to_json,
    turbomind_problem,
    turbomind_supports,
)
from launcher.errors import LaunchError
from launcher.model.overlay import check_overlay
from launcher.plan.build import Plan, build_plan, gpu_shortage, make_overlay, overlay_digest, with_files
from launcher.plan.request import CHECKED, PARSED, Entered, PlanRequest, check_request
from launcher.rules import checks
from launcher.rules.checks import BadOption
from launcher.rules.kvcache import GiB
from launcher.runtime import paths
from launcher.runtime.supervise import DEFAULT_HEALTH_TIMEOUT_S


class NoGpu(LaunchError):
    """No usable NVIDIA GPU and driver here: neither engine can run, so serve stops before anything."""

    reason: str
    message = ("serving needs an NVIDIA GPU and its driver, and {reason}. What works on this machine: "
               "`launch plan`, `launch serve --dry-run --gpu-memory GiB`, and `launch probe --url` "
               "against a server on a GPU machine.")


class EngineUnavailable(LaunchError):
    """The chosen engine cannot run here or cannot take this model; no silent fallback."""

    backend: str
    reason: str
    message = ("the {backend} engine cannot serve this: {reason}. launch never falls back silently: "
               "add --backend pytorch to use lmdeploy's PyTorch engine instead.")


class NoSessionFits(LaunchError):
    session_len: int
    per_session_gib: float
    budget_gib: float
    advice: tuple[str, ...]
    message = ("not even one {session_len}-token session fits: it needs {per_session_gib:.2f} GiB of KV cache "
               "per GPU, the budget is {budget_gib:.2f} GiB. Would fit: {advice_list}")


LOG_NAME = "server.log"


@dataclass(frozen=True)
class ServeRequest(Entered):
    """``serve``'s request: the one plan request (every flag ``plan`` takes too, the scale-out ones
    included) and only what serving adds. ``check_serve`` checks it once (``from_flags``: the
    parser read every value already)."""

    plan: PlanRequest
    api_keys: tuple[str, ...] = ()  # as given by --api-key flags
    api_key_file: Path | None = None
    dry_run: bool = False
    as_json: bool = False
    probe: bool = False
    health_timeout_s: float | str = DEFAULT_HEALTH_TIMEOUT_S
    proxy_url: str | None = None  # register with this proxy once healthy, leave it on stop
    advertise_url: str | None = None  # the URL the proxy reaches this server at
    ppl_text: Path | None = None  # with probe: also `launch ppl` on this text at the probe's lengths


def _check_engine(plan: Plan, *, here: bool = True) -> None:
    """No silent fallback: the chosen engine must take the (patched) architecture and, with ``here``
    (serving on this machine, not a dry run), exist here."""
    if plan.engine.backend != "turbomind":
        return
    if not turbomind_supports(plan.patched_config):
        arch = architecture_of(plan.patched_config)
        raise EngineUnavailable("turbomind", f"TurboMind does not support the {arch} architecture")
    problem = turbomind_problem() if here else None
    if problem:
        raise EngineUnavailable("turbomind", problem)


def refusal(plan: Plan, *, here: bool = True) -> LaunchError | None:
    """What serve refuses this plan for, from the plan alone: more tp than the GPUs counted here, no
    session fitting the KV cache, an engine that cannot take the model (and, with ``here``, is not
    installed here). ``serve --dry-run`` (``here`` False) shows it and exits as serve would."""
    try:
        _check_gpus(plan)
        _check_memory(plan)
        _check_engine(plan, here=here)
    except LaunchError as err:
        return err
    return None


def check_serve(request: ServeRequest) -> ServeRequest:
    """``request`` checked once: its plan request (``check_request``), ``--health-timeout`` when the
    parser did not read it, and the one rule of serve's own between flags: across nodes, serve runs
    one node and must be told which (two nodes at rank 0 would wait for each other forever; a dry
    run shows them all). A checked request is returned as it is."""
    if request.stage == CHECKED:
        return request
    timeout = request.health_timeout_s
    if request.stage != PARSED:
        timeout = checks.seconds("--health-timeout", timeout, example=1800)
    plan = check_request(request.plan)
    if plan.nnodes > 1 and plan.node_rank is None and not request.dry_run:
        raise BadOption("--node-rank", "", f"say which node this is, 0 to {plan.nnodes - 1} (0 serves HTTP), "
                        "e.g. --node-rank 0")
    return replace(request, plan=plan, health_timeout_s=timeout).entered(CHECKED)


def _check_gpus(plan: Plan) -> None:
    tp = plan.engine.config.tp
    if shortage := gpu_shortage(tp, plan.request.nnodes, plan.gpu_count):
        raise BadOption("--tp", str(tp), f"{shortage}; give a tp that fits")


def _check_memory(plan: Plan) -> None:
    m = plan.memory
    if m is not None and not m.fits:
        raise NoSessionFits(plan.decision.session_len, m.bytes_per_session / GiB, m.budget_bytes / GiB, m.advice)


def prepare(request: ServeRequest) -> Plan:
    """The plan serve would run, from the config alone (no weights downloaded), for a checked
    request: every flag was checked before the config is looked at (for a repo id: before any
    request)."""
    from launcher.model.source import resolve
    from launcher.runtime.apikeys import resolve_api_keys

    keys = resolve_api_keys(list(request.api_keys), key_file=request.api_key_file) or []
    wanted = request.plan
    return build_plan(wanted, resolve(wanted.model, need_files=False, fetching=wanted.fetching), api_keys=tuple(keys))


def _run_dir(plan: Plan) -> Path:
    return paths.run_dir(f"{plan.engine.model_name}-{plan.engine.port}")


def _spec(plan: Plan, model_path: Path, engine_extra: dict | None = None) -> tuple[bytes, Path]:
    """(the serving process's spec, handed over on its stdin: API keys never on disk; its log)."""
    spec = spec_to_json(plan.engine, str(model_path))
    spec["engine_config"].update(engine_extra or {})  # nnodes, node_rank, dist_init_addr
    return json.dumps(spec).encode(), _run_dir(plan) / LOG_NAME


ENGINE_SERVER = ("-m", "launcher.engine.server")
def serve(request: ServeRequest, out: TextIO | None = None,
          server_argv: tuple[str, ...] | None = None) -> int:
    """Run serve end to end. Returns the exit code (0 after a clean stop).

    One engine; or with ``replicas`` > 1, lmdeploy's proxy and that many engines behind it
    (``launcher.scaleout.replicas``); or with ``nnodes`` > 1, this node's share of one engine across
    nodes. ``server_argv`` is the serving process's command before the spec's path (``/dev/stdin``:
    the spec comes through a pipe; default: this Python running ``launcher.engine.server``); the
    tests pass a stand-in for the GPU engine there."""
    from launcher.plan.layout import layout_for_plan

    out = out or sys.stdout
    if not request.dry_run:  # without a GPU neither engine runs: say so before anything is read or written
        from launcher.runtime.gpu import nvidia_problem

        if problem := nvidia_problem():
            raise NoGpu(problem)
    request = check_serve(request)  # every value once (the parser's are taken as read), the rules between flags
    from launcher.runtime.address import exposure_warnings, port_free, say_warnings

    joining = check_joining(request)
    plan = prepare(request)
    layout = layout_for_plan(plan)
    router = plan.request.router  # checked, its default resolved (with replicas; else None)
    warnings = exposure_warnings(plan.engine.host, plan.engine.port, bool(plan.engine.api_keys),
                                 node_api=router == "lmdeploy")
    binds = [(plan.engine.host, plan.engine.port)]
    binds += [(r.host, r.port) for r in layout.replicas] if plan.request.scale_out == "replicas" else []
    if request.dry_run:
        return _dry_run(plan, layout, binds, warnings, request.as_json, out)

    from launcher.runtime.ports import PortClaim

    refused = refusal(plan)
    if refused is not None:
        raise refused
    if router == "vllm":
        from launcher.scaleout.router import vllm_router_path

        vllm_router_path()  # installed, before anything is written
    for host, port in binds:
        port_free(host, port)  # checked: the request's, the layout's
    if joining is not None:
        from launcher.scaleout.nodes import proxy_nodes

        proxy_nodes(joining.proxy, key=plan.engine.api_keys[0] if plan.engine.api_keys else None)  # before anything slow
    # claimed before anything is written: a second run on one of these ports stops here
    with PortClaim(plan.engine.host, [port for _, port in binds]):
        say_warnings([*warnings, *plan.warnings], sys.stderr)
        if plan.memory is None:
            say_warnings([f"the KV-cache fit is not checked: {plan.memory_note}"], sys.stderr)
        return _serve_claimed(plan, layout, joining, request, out, server_argv)


def _dry_run(plan: Plan, layout, binds: list[tuple[str, int]], warnings: list[str], as_json: bool,
            out: TextIO) -> int:
    """``serve --dry-run``: the plan and the exact engine call; the warnings serve would print; and
    what serve would refuse (``refusal``), shown and raised, so the dry run exits as serve would. A port
    of ``binds`` in use, or a host not of this machine, is refused first, alone, as serve refuses it."""
    from launcher.plan.build import OVERLAY_PLACEHOLDER
    from launcher.plan.render import engine_call, plan_json, render_plan
    from launcher.runtime.address import port_free, say_warnings

    for host, port in binds:  # serve refuses these before it prints anything: so does its dry run
        port_free(host, port)  # the bind test alone: nothing is claimed
    refused = refusal(plan, here=False)
    where, shown = "the serving process", plan
    if plan.request.scale_out == "replicas":  # each replica listens on its own loopback port, not the proxy's
        where = "replica 0's serving process; each replica's differs only in its port"
        shown = replace(plan, engine=layout.replicas[0].engine)
    call = engine_call(shown, str(plan.overlay_path or OVERLAY_PLACEHOLDER))
    say_warnings(warnings, sys.stderr)
    if as_json:
        data = plan_json(plan, layout)
        data["engine_call"] = call
        data["warnings"] = [*data.get("warnings", []), *warnings]
        data["refused"] = None if refused is None else {"error": type(refused).__name__, "message": str(refused),
                                                        "exit_code": refused.exit_code}
        print(json.dumps(data, indent=2, ensure_ascii=False), file=out)
    else:
        print(render_plan(plan, layout), file=out)
        print(f"\nengine call (in {where}):", file=out)
        print(call, file=out)
        if refused is not None:
            print(f"\nserve would refuse this: {refused}", file=out)
    out.flush()
    if refused is not None:
        raise refused
    return 0


def _serve_claimed(plan: Plan, layout, joining: Joining | None, request: ServeRequest,
                   out: TextIO, server_argv: tuple[str, ...] | None) -> int:
    """The slow part, with the ports claimed: the files, the overlay, the server(s)."""
    from launcher.plan.layout import layout_for_plan
    from launcher.runtime.address import say_warnings
    from launcher.runtime.process import SPEC_ON_STDIN
    from launcher.runtime.supervise import run_supervised

    # The plan stands unless the downloaded config differs.
    full, note = with_files(plan)
    if note:
        print(note, file=sys.stderr)
        say_warnings([w for w in full.warnings if w not in plan.warnings], sys.stderr)
        _check_gpus(full)
        if full.architecture != plan.architecture:
            _check_engine(full)
        layout = layout_for_plan(full)
    _check_memory(full)  # now with the weights' real size
    overlay = make_overlay(full)
    check_overlay(overlay.path)
    print(f"overlay: {overlay.path} ({'reused' if overlay.reused else 'written'})", file=sys.stderr)
    base_argv = list(server_argv or (sys.executable, *ENGINE_SERVER))
    scale = full.request  # the checked request: its scale-out flags
    if scale.scale_out == "replicas":
        return _serve_replicas(full, layout, overlay.path, base_argv, request, out)
    extra = None
    if scale.scale_out == "nodes":
        print(f"overlay hash: {overlay_digest(full)} (compare it across the nodes)", file=sys.stderr)
        extra = {"nnodes": scale.nnodes, "node_rank": scale.node_rank, "dist_init_addr": scale.dist_init_addr}
    spec, log_path = _spec(full, overlay.path, extra)
    on_join, on_stop = join_hooks(joining, out) if joining is not None else (None, None)

    def on_ready(info) -> None:
        if on_join:
            on_join(info)  # registered first: a replica the proxy refuses is not announced
        for line in info.summary_lines():
            print(line, file=out)
        if scale.scale_out == "nodes":
            role = ("this node serves the OpenAI API" if scale.node_rank == 0
                    else "engine share only: clients use node 0's address")
            print(f"  node {scale.node_rank} of {scale.nnodes} (tp {full.engine.config.tp} in all, rendezvous "
                  f"{scale.dist_init_addr}): {role}", file=out)
        out.flush()

    return run_supervised(
        base_argv + [SPEC_ON_STDIN],
        host=full.engine.host,
        port=full.engine.port,
        log_path=log_path,
        model_name=full.engine.model_name,
        api_keys=list(full.engine.api_keys) or None,
        health_timeout_s=request.health_timeout_s,
        on_ready=on_ready,
        probe=probe_hook(full, log_path.parent, out, request.ppl_text) if request.probe else None,
        on_stop=on_stop,
        stdin_data=spec,
    )


def _serve_replicas(plan: Plan, layout, overlay_path: Path, base_argv: list[str], request: ServeRequest,
                    out: TextIO) -> int:
    """The replicas' specs (one overlay, each its own port) and the proxy's, each handed over on
    its process's stdin; then run them all."""
    from launcher.runtime.process import SPEC_ON_STDIN
    from launcher.scaleout.proxy import DEFAULT_START_TIMEOUT_S
    from launcher.scaleout.replicas import ReplicaRun, run_replicas

    specs, logs = [], []
    for replica in layout.replicas:
        spec, log_path = _spec(replace(plan, engine=replica.engine), overlay_path)
        specs.append(spec)
        logs.append(log_path)
    host, port = plan.engine.host, plan.engine.port
    run = ReplicaRun(router=plan.request.router, proxy_dir=paths.run_dir(f"proxy-{port}"),
                     proxy_host=host, proxy_port=port, layout=layout,
                     argvs=tuple(tuple(base_argv + [SPEC_ON_STDIN]) for _ in specs), specs=tuple(specs),
                     logs=tuple(logs), api_keys=plan.engine.api_keys, model_name=plan.engine.model_name)
    return run_replicas(run, health_timeout_s=request.health_timeout_s, proxy_timeout_s=DEFAULT_START_TIMEOUT_S,
                        out=out)
