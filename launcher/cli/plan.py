"""`launch plan`: what serve would do, without a GPU and without touching anything."""

from __future__ import annotations

import json

import typer

from launcher.cli.app import app
from launcher.cli.options import (
    ENGINE_FLAGS,
    MODEL_FLAGS,
    ROUTER_FLAGS,
    SERVER_FLAGS,
    JsonOpt,
    request_command,
)
from launcher.plan.request import PlanRequest


@app.command(
    epilog=(
        "Examples:  launch plan qwen2.5-7b-instruct --context 64k   |   launch plan internlm-chat-7b --factor 2   |   "
        "launch plan qwen2.5-7b-instruct --factor 4 --type yarn --json   |   "
        "launch plan ./my-model --factor 2 --gpu-memory 80   |   "
        "launch plan internlm2_5-7b-chat --factor 4 --tp 2 --replicas 4 --gpu-memory 80   |   "
        "launch plan internlm2_5-7b-chat --factor 4 --tp 16 --nnodes 2 --dist-init-addr 10.0.0.1:29500"
    )
)
@request_command(MODEL_FLAGS, ENGINE_FLAGS, SERVER_FLAGS, ROUTER_FLAGS, "trust_remote_code")
def plan(request: PlanRequest, as_json: JsonOpt = False) -> None:
    """Show what `serve` would do: the config diff, session length, KV-cache memory, engine call.

    MODEL is a preset name (`launch presets`), a Hugging Face repo id ORG/NAME, or a local model
    directory. Nothing is written and no weights are downloaded. With --replicas or --nnodes: the
    whole layout, each replica's or node's GPUs, port and command, and the total capacity.
    """
    from launcher.plan.layout import plan_with_layout
    from launcher.plan.render import plan_json, render_plan

    result, layout = plan_with_layout(request)
    if as_json:
        typer.echo(json.dumps(plan_json(result, layout), indent=2, ensure_ascii=False))
    else:
        typer.echo(render_plan(result, layout))
