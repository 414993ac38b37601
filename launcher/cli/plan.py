"""`launch plan`: what serve would do, without a GPU and without touching anything."""

from __future__ import annotations

import json

import typer

from .app import app
from .options import (
    BackendOpt,
    CacheRatioOpt,
    FactorOpt,
    ForceOpt,
    GpuMemoryOpt,
    JsonOpt,
    MaxBatchOpt,
    ModelArg,
    QuantOpt,
    SessionLenOpt,
    TpOpt,
    TypeOpt,
)


@app.command(
    epilog=(
        "Examples:  launch plan internlm-chat-7b --factor 2   |   "
        "launch plan qwen2.5-7b-instruct --factor 4 --type yarn --json   |   "
        "launch plan ./my-model --factor 2 --gpu-memory 80"
    )
)
def plan(
    model: ModelArg,
    factor: FactorOpt = None,
    rope_type: TypeOpt = None,
    session_len: SessionLenOpt = None,
    force: ForceOpt = False,
    backend: BackendOpt = None,
    tp: TpOpt = None,
    max_batch_size: MaxBatchOpt = None,
    cache_max_entry_count: CacheRatioOpt = None,
    quant_policy: QuantOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what `serve` would do: the config diff, session length, KV-cache memory, engine call.

    MODEL is a preset name (`launch presets`), a Hugging Face repo id ORG/NAME, or a local model
    directory. Nothing is written and no weights are downloaded.
    """
    from ..plan import PlanRequest, build_plan
    from ..render import plan_json, render_plan

    result = build_plan(
        PlanRequest(
            model=model, factor=factor, rope_type=rope_type, session_len=session_len, force=force,
            backend=backend, tp=tp, max_batch_size=max_batch_size,
            cache_max_entry_count=cache_max_entry_count, quant_policy=quant_policy,
            gpu_memory_gib=gpu_memory,
        )
    )
    if as_json:
        typer.echo(json.dumps(plan_json(result), indent=2, ensure_ascii=False))
    else:
        typer.echo(render_plan(result))
