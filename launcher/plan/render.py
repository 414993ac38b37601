"""Showing a plan: the text ``launch plan`` prints, its ``--json`` object, the config diff, and the
in-process lmdeploy call ``serve --dry-run`` shows. Reads a built ``Plan``; computes nothing new."""

from __future__ import annotations

import difflib

from launcher.engine.spec import architecture_of, command_line, turbomind_supports
from launcher.model.overlay import config_bytes
from launcher.plan.build import OVERLAY_PLACEHOLDER, Plan, overlay_digest
from launcher.rules.capacity import Capacity
from launcher.rules.kvcache import GiB, MemoryPlan


def config_diff(plan: Plan) -> str:
    before = config_bytes(plan.source.config).decode().splitlines()
    after = config_bytes(plan.patched_config).decode().splitlines()
    lines = difflib.unified_diff(before, after, "config.json", "config.json (overlay)", n=1, lineterm="")
    return "\n".join(lines)


def _memory_json(memory: MemoryPlan | None) -> dict | None:
    if memory is None:
        return None
    return {
        "gpu_bytes": memory.gpu_bytes,
        "gpu_source": memory.gpu_source,
        "weights_bytes": memory.weights_bytes,
        "weights_source": memory.weights_source,
        "cache_budget_bytes": memory.budget_bytes,
        "bytes_per_session": memory.bytes_per_session,
        "sessions_that_fit": memory.sessions,
        "fits": memory.fits,
        "largest_session_len": memory.largest_session_len,
        "advice": list(memory.advice),
    }


def plan_capacity(plan: Plan) -> Capacity:
    """One engine's: what its KV cache holds, capped at its max_batch_size."""
    return Capacity(plan.memory.sessions if plan.memory is not None else None, plan.engine.config.max_batch_size)


def layout_json(layout) -> dict:
    """``replicas`` (with the proxy in front) or ``nodes``, and the total capacity, for ``--json``."""
    from launcher.plan.layout import NodeLayout, nodes_json, replicas_json

    if isinstance(layout, NodeLayout):
        return {"nodes": nodes_json(layout),
                "capacity": {**layout.capacity.json(), "session_len": layout.session_len,
                             "nnodes": layout.nnodes, "gpus_per_node": layout.gpus_per_node, "tp": layout.tp,
                             "dist_init_addr": layout.dist_init_addr}}
    return {"replicas": replicas_json(layout),
            "capacity": {**layout.capacity.json(), "sessions_per_replica": layout.sessions_per_replica,
                         "session_len": layout.session_len, "replicas": len(layout.replicas), "tp": layout.tp,
                         "gpus": layout.tp * len(layout.replicas), "gpu_ids_assumed": layout.devices_assumed}}


def proxy_of(plan: Plan, layout) -> dict:
    """The router in front of the replicas of ``layout``, on the plan's (public) host and port: lmdeploy's
    proxy with the layout's routing, or vllm-router (on a loopback port of its own, chosen at start: shown
    as PORT) behind launch's front."""
    from launcher.engine.routing import proxy_command, vllm_router_command

    if layout.router == "lmdeploy":
        argv = proxy_command(plan.engine.host, plan.engine.port, layout.routing)
        return {"host": plan.engine.host, "port": plan.engine.port, "router": layout.router,
                "routing": layout.routing, "command": argv, "command_line": command_line(argv)}
    # two processes: launch's front on the public host and port (what `launch proxy start` runs), and
    # vllm-router behind it on loopback ports chosen at start (shown as PORT and PORT+1)
    inner = [*vllm_router_command(0, 0, 1800, "PORT+2")]
    inner[inner.index("--port") + 1] = "PORT"
    inner[inner.index("--prometheus-port") + 1] = "PORT+1"
    argv = ["launch", "proxy", "start", "--host", plan.engine.host, "--port", str(plan.engine.port)]
    return {"host": plan.engine.host, "port": plan.engine.port, "router": layout.router,
            "routing": "by load (vllm-router), retried on another replica", "command": argv,
            "command_line": command_line(argv), "router_command": inner, "router_command_line": command_line(inner)}


def _command(role: str, argv, env: dict | None = None, **where) -> dict:
    return {"role": role, **where, "env": dict(env or {}), "command": list(argv), "command_line": command_line(list(argv))}


def commands_json(plan: Plan, layout=None) -> list[dict]:
    """Every process ``serve`` runs for this plan, in the order it starts them, as the equivalent
    lmdeploy command (API keys left out) and the environment it gets: one server; or the proxy,
    then each replica; or each node (serve runs this node's)."""
    if layout is None:
        return [_command("server", plan.command)]
    from launcher.plan.layout import ReplicaLayout

    if isinstance(layout, ReplicaLayout):
        return [_command("proxy", proxy_of(plan, layout)["command"]),
                *(_command("replica", r.argv, r.env, index=r.index) for r in layout.replicas)]
    return [_command("node", n.argv, rank=n.rank) for n in layout.nodes]


def plan_json(plan: Plan, layout=None) -> dict:
    """The plan as one JSON object; with a scale-out ``layout``: its ``replicas`` (and ``proxy``) or
    ``nodes`` lists and the total ``capacity``. ``commands`` lists every process serve runs; the
    top-level ``command`` is the one server's, ``null`` when serve runs several (no single
    api_server command would be what it runs)."""
    data = _plan_json(plan)
    data["commands"] = commands_json(plan, layout)
    data["capacity"] = {**plan_capacity(plan).json(), "session_len": plan.decision.session_len}
    if layout is not None:
        from launcher.plan.layout import ReplicaLayout

        data["command"] = data["command_line"] = None
        if isinstance(layout, ReplicaLayout):
            data["proxy"] = proxy_of(plan, layout)
        data.update(layout_json(layout))
    return data


def _plan_json(plan: Plan) -> dict:
    d = plan.decision
    cfg = plan.engine.config
    kv0 = plan.kv[cfg.quant_policy]
    return {
        "model": plan.source.label,
        "name": plan.engine.model_name,
        "preset": plan.source.preset.name if plan.source.preset else None,
        "repo_id": plan.source.repo_id,
        "revision": plan.source.revision,
        "config_source": plan.source.config_origin,
        "architecture": plan.architecture,
        "attention_bias": plan.section.get("attention_bias"),
        "turbomind_supported": turbomind_supports(plan.patched_config),
        "context": plan.request.context,
        "context_how": plan.context_how,
        "recipe": _recipe_json(plan),
        "native_context": d.native_context,
        "factor": d.factor,
        "rope_type": d.rope_type,
        "rope_key": ".".join(d.section + (d.key,)),
        "reader": {**d.reader.as_dict(), "read_through": reads_through(plan),
                   "outer": d.outer.as_dict() if d.outer else None},
        "session_len": d.session_len,
        "covered_context": d.covered_context,
        "rope_scaling": d.settings,
        "max_position_embeddings": d.max_position_embeddings,
        "config_unchanged": d.unchanged,
        "config_changes": [
            {"key": c.dotted, "old": c.old, "new": None if c.removed else c.new, "removed": c.removed}
            for c in d.changes
        ],
        "kv_cache": {
            "tp": cfg.tp,
            "cp": cfg.cp,
            "quant_policy": cfg.quant_policy,
            "bytes_per_token": kv0.bytes_per_token,
            "bytes_per_session": kv0.bytes_per_session,
            "by_quant_policy": {
                cost.name: {"quant_policy": q, "bytes_per_token": cost.bytes_per_token,
                            "bytes_per_session": cost.bytes_per_session}
                for q, cost in plan.kv.items()
            },
        },
        "memory": _memory_json(plan.memory),
        "memory_note": plan.memory_note or None,
        "engine": {
            "backend": plan.engine.backend,
            "defaults_from": dict(plan.defaults_from),
            "class": plan.engine.config_class,
            "config": plan.engine.config_kwargs(),
            "model_name": plan.engine.model_name,
            "trust_remote_code": plan.engine.trust_remote_code,
            "chat_template": plan.engine.chat_template,
            "server_name": plan.engine.host,
            "server_port": plan.engine.port,
        },
        "overlay": str(plan.overlay_path) if plan.overlay_path else None,
        "overlay_sha256": overlay_digest(plan),
        "command": plan.command,
        "command_line": command_line(plan.command),
        "warnings": list(plan.warnings),
    }


def _recipe_json(plan: Plan) -> dict | None:
    r = plan.recipe
    if r is None:
        return None
    return {"source": r.source, "session_len": r.session_len, "rope_type": r.rope_type, "factor": r.factor,
            "engine": dict(r.engine), "used_for": ["session_len"] * (plan.request.context is None
                                                                   and plan.request.session_len is None)
            + sorted(k for k, v in plan.defaults_from.items() if v == "recipe")}


def reads_through(plan: Plan) -> str:
    """How lmdeploy will load the overlay: the model's own config class, or (a class of the checkpoint's
    code, the whole config's or its language model's, with trust_remote_code off) its generic fallback, which
    checks nothing."""
    if plan.decision.remote_class is not None and not plan.engine.trust_remote_code:
        return "generic fallback"
    return "own class"


def reader_line(plan: Plan) -> str:
    d = plan.decision
    if reads_through(plan) == "generic fallback":
        remote = d.remote_class
        return (f"lmdeploy's generic fallback: trust_remote_code is off, so {remote.name} "
                f"({remote.code}, the model's own code) is not run")
    inner = f"{d.outer.describe()}, its {'.'.join(d.section)} by " if d.outer else ""
    return f"{inner}{d.reader.describe()}, then lmdeploy's {plan.engine.backend} engine"


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def render_plan(plan: Plan, layout=None) -> str:
    """The plan as text; with a scale-out ``layout``, the whole layout after it (then each process's
    command is shown there, and no single top-level command)."""
    text = _render_plan(plan, layout)
    if layout is None:
        return text
    from launcher.plan.layout import ReplicaLayout, render_nodes, render_replicas

    if isinstance(layout, ReplicaLayout):
        proxy = proxy_of(plan, layout)
        who = "lmdeploy's proxy" if proxy["router"] == "lmdeploy" else "launch's front, vllm-router behind it"
        inner = f"\n               vllm-router: {proxy['router_command_line']}" if "router_command" in proxy else ""
        return (f"{text}\n\nproxy          http://{proxy['host']}:{proxy['port']} ({who}, public; "
                f"replicas on loopback; routing {proxy['routing']})\n               {proxy['command_line']}{inner}\n"
                f"{render_replicas(layout)}")
    return f"{text}\n\n{render_nodes(layout)}"


def _command_lines(plan: Plan, layout) -> list[str]:
    if layout is None:
        return ["command        " + command_line(plan.command),
                ("               (the same engine call; API keys left out. Unlike launch serve, lmdeploy's own CLI"
                 " falls back to the PyTorch engine silently when TurboMind cannot take the model.)")]
    from launcher.plan.layout import ReplicaLayout

    if isinstance(layout, ReplicaLayout):
        router = ("lmdeploy's proxy" if layout.router == "lmdeploy" else "launch's front (vllm-router behind it on "
                  "loopback)")
        return [(f"commands       serve runs {router} on {plan.engine.host}:{plan.engine.port} and "
                 f"{len(layout.replicas)} replica(s) behind it; each one's command is below (API keys left out)")]
    return ["commands       one per node, below (serve --nnodes runs this node's; API keys left out)"]


def _render_plan(plan: Plan, layout=None) -> str:
    d = plan.decision
    out: list[str] = []
    src = plan.source
    where = src.repo_id or (str(src.path) if src.path else src.label)
    out.append(f"model          {src.name}  ({where})")
    out.append(f"config from    {src.config_origin}")
    before_arch = architecture_of(src.config)
    arch = plan.architecture
    arch_line = arch if arch == before_arch else f"{before_arch} -> {arch}"
    if plan.section.get("attention_bias"):
        arch_line += " (attention bias)"
    out.append(f"architecture   {arch_line}")
    if d.rope_type == "default":
        out.append(f"RoPE           no scaling: the native {d.native_context:,} tokens")
    else:
        out.append(
            f"RoPE           {d.rope_type} x{d.factor:g} over a native {d.native_context:,} tokens "
            f"({'.'.join(d.section + (d.key,))}), covers {d.covered_context:,}"
        )
    out.append(f"read by        {reader_line(plan)}")
    if plan.request.context is not None:
        out.append(f"context        {plan.request.context:,} tokens asked: {plan.context_how}")
    out.append(f"session_len    {d.session_len:,} tokens")
    if plan.recipe is not None:
        from_recipe = [k for k, v in plan.defaults_from.items() if v == "recipe"]
        values = ", ".join(f"{k} {getattr(plan.settings, k):g}" for k in from_recipe)
        out.append(f"recipe         published: {plan.recipe.rope_type} x{plan.recipe.factor:g} up to "
                   f"{plan.recipe.session_len:,} tokens{'; ' + values if values else ''} ({plan.recipe.source})")
    out.append("")
    if d.unchanged:
        out.append("config.json    unchanged (it already carries these settings)")
    else:
        out.append("config.json changes (written to the overlay; the source is never touched):")
        out.extend("  " + line for line in config_diff(plan).splitlines())
    out.append("")
    cfg = plan.engine.config
    tp = cfg.tp
    split = f"tp {tp}, cp {cfg.cp}: each GPU holds 1/{cfg.cp} of the tokens" if cfg.cp > 1 else f"tp {tp}"
    out.append(f"KV cache per GPU ({split}), {d.session_len:,}-token session:")
    if cfg.enable_prefix_caching:
        out.append("  prefix caching on: a repeated prompt prefix reuses its cached blocks")
    for q, cost in plan.kv.items():
        mark = "  <- --quant-policy" if q == cfg.quant_policy else ""
        out.append(
            f"  {cost.name:<5} {cost.bytes_per_token:>12,} B/token   {_gib(cost.bytes_per_session):>14} per session{mark}"
        )
    m = plan.memory
    if m is not None:
        out.append(
            f"memory         GPU {_gib(m.gpu_bytes)} free ({m.gpu_source}), weights {_gib(m.weights_bytes)} "
            f"({m.weights_source}), cache budget {_gib(m.budget_bytes)} per GPU"
        )
        if m.fits:
            out.append(f"               {m.sessions} full-length session(s) fit in the KV cache at once")
        else:
            out.append("               NOT ONE full-length session fits. Would fit: " + "; ".join(m.advice))
    else:
        out.append(f"memory         {plan.memory_note}")
    if layout is None and m is not None and m.fits:
        out.append(f"capacity       {plan_capacity(plan).text()}")
    out.append("")
    out.append(f"engine         {_config_call(plan)}")
    out.append(f"overlay        {plan.overlay_path or OVERLAY_PLACEHOLDER}")
    out.append(f"overlay hash   {overlay_digest(plan)}  (the same on every node with the same settings)")
    out.extend(_command_lines(plan, layout))
    for warning in plan.warnings:
        out.append(f"warning: {warning}")
    return "\n".join(out)


def _config_call(plan: Plan) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in plan.engine.config_kwargs().items())
    return f"{plan.engine.config_class}({kwargs})"


def engine_call(plan: Plan, model_path: str) -> str:
    """The in-process lmdeploy call, as text: what the serving process will run."""
    template = "ChatTemplateConfig(...)" if plan.engine.chat_template else "None"
    return (
        "lmdeploy.serve.openai.api_server.serve(\n"
        f"    {model_path!r},\n"
        f"    model_name={plan.engine.model_name!r},\n"
        f"    backend={plan.engine.backend!r},\n"
        f"    backend_config={_config_call(plan)},\n"
        f"    chat_template_config={template},\n"
        f"    server_name={plan.engine.host!r}, server_port={plan.engine.port},\n"
        f"    api_keys={'[...]' if plan.engine.api_keys else None}, "
        f"trust_remote_code={plan.engine.trust_remote_code})"
    )
