"""`launch patch`: write the overlay (patched config.json + links) and print its path."""

from __future__ import annotations

import sys

import typer

from launcher.cli.app import app
from launcher.cli.options import MODEL_FLAGS, request_command
from launcher.plan.request import PlanRequest


@app.command(
    epilog="Examples:  launch patch ./internlm2-chat-7b --factor 2   |   launch patch ./qwen --factor 4 --type yarn --out ./qwen-128k"
)
@request_command(MODEL_FLAGS, "out", "revision", "trust_remote_code")
def patch(request: PlanRequest) -> None:
    """Write a patched view of MODEL (never modifying it) and print its path as the last line.

    MODEL is a preset name, a Hugging Face repo id ORG/NAME (downloaded first), or a local model
    directory.
    """
    from launcher.plan.build import build_plan, make_overlay, with_files
    from launcher.plan.render import reader_line

    # Every flag (the parser) and --out first, then the config alone, then the plan; only then the files.
    plan, note = with_files(build_plan(request))
    if note:
        typer.echo(note, err=True)
    overlay = make_overlay(plan)
    d = plan.decision
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"read by: {reader_line(plan)}", err=True)
    state = "reused" if overlay.reused else "written"
    typer.echo(
        f"{state}: {d.rope_type} x{d.factor:g}, native {d.native_context}, session_len {d.session_len}, "
        f"{overlay.files} linked files",
        err=True,
    )
    sys.stdout.flush()
    typer.echo(str(overlay.path))
