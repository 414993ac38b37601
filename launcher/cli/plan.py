"""`launch plan`: what serve would do, without a GPU and without touching anything."""

from __future__ import annotations

import json

import typer

from launcher.cli.app import app
from launcher.cli.options import (
    BackendOpt,
    CacheRatioOpt,
    ContextOpt,
    CpOpt,
    DistInitAddrOpt,
    FactorOpt,
    ForceOpt,
    GpuMemoryOpt,
    HostOpt,
    JsonOpt,
    MaxBatchOpt,
    ModelArg,
    NnodesOpt,
    NodeRankOpt,
    PortOpt,
    PrefixCachingOpt,
    QuantOpt,
    ReplicasOpt,
    RouterOpt,
    RoutingOpt,
    SessionLenOpt,
    TpOpt,
    TrustOpt,
    TypeOpt,
)
from launcher.engine.spec import DEFAULT_HOST, DEFAULT_PORT


@app.command(
    epilog=(
        "Examples:  launch plan qwen2.5-7b-instruct --context 64k   |   launch plan internlm-chat-7b --factor 2   |   "
        "launch plan qwen2.5-7b-instruct --factor 4 --type yarn --json   |   "
        "launch plan ./my-model --factor 2 --gpu-memory 80   |   "
        "launch plan internlm2_5-7b-chat --factor 4 --tp 2 --replicas 4 --gpu-memory 80   |   "
        "launch plan internlm2_5-7b-chat --factor 4 --tp 16 --nnodes 2 --dist-init-addr 10.0.0.1:29500"
    )
)
def plan(
    model: ModelArg,
    factor: FactorOpt = None,
    rope_type: TypeOpt = None,
    session_len: SessionLenOpt = None,
    context: ContextOpt = None,
    force: ForceOpt = False,
    backend: BackendOpt = None,
    tp: TpOpt = None,
    max_batch_size: MaxBatchOpt = None,
    cache_max_entry_count: CacheRatioOpt = None,
    quant_policy: QuantOpt = None,
    cp: CpOpt = None,
    enable_prefix_caching: PrefixCachingOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = str(DEFAULT_PORT),
    replicas: ReplicasOpt = "1",
    nnodes: NnodesOpt = "1",
    node_rank: NodeRankOpt = None,
    dist_init_addr: DistInitAddrOpt = None,
    routing: RoutingOpt = None,
    router: RouterOpt = None,
    trust_remote_code: TrustOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what `serve` would do: the config diff, session length, KV-cache memory, engine call.

    MODEL is a preset name (`launch presets`), a Hugging Face repo id ORG/NAME, or a local model
    directory. Nothing is written and no weights are downloaded. With --replicas or --nnodes: the
    whole layout, each replica's or node's GPUs, port and command, and the total capacity.
    """
    from launcher.plan.layout import plan_with_layout
    from launcher.plan.render import plan_json, render_plan
    from launcher.plan.request import PlanRequest

    result, layout = plan_with_layout(PlanRequest.from_flags(
        model=model, factor=factor, rope_type=rope_type, session_len=session_len, context=context, force=force, backend=backend,
        tp=tp, max_batch_size=max_batch_size, cache_max_entry_count=cache_max_entry_count,
        quant_policy=quant_policy, cp=cp, enable_prefix_caching=enable_prefix_caching, gpu_memory_gib=gpu_memory, host=host, port=port, replicas=replicas,
        nnodes=nnodes, node_rank=node_rank, dist_init_addr=dist_init_addr, routing=routing, router=router,
        trust_remote_code=trust_remote_code,
    ))
    if as_json:
        typer.echo(json.dumps(plan_json(result, layout), indent=2, ensure_ascii=False))
    else:
        typer.echo(render_plan(result, layout))
