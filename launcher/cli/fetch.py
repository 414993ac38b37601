"""`launch fetch`: download a checkpoint (only what serving needs) into the Hugging Face cache."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app


@app.command(
    epilog=(
        "Examples:  launch fetch internlm2_5-7b-chat   |   "
        "launch fetch Qwen/Qwen2.5-7B-Instruct --revision main   |   "
        "path=$(launch fetch -q internlm/internlm2_5-7b-chat)"
    )
)
def fetch(
    model: Annotated[
        str,
        typer.Argument(help="A preset name (see `launch presets`) or a Hugging Face repo id ORG/NAME.",
                       show_default=False),
    ],
    revision: Annotated[
        str | None,
        typer.Option("--revision", "-r", help="Branch, tag or commit sha. Default: the preset's pinned "
                     "revision, else main.", show_default=False),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option("--trust-remote-code", help="Also fetch the repo's own *.py code (a preset that "
                     "needs it says so itself)."),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bars and no summary: print only the path."),
    ] = False,
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", help="Give up when the hub sends nothing for this many seconds. "
                     "Default: $LAUNCH_HUB_TIMEOUT, else 600.", show_default=False),
    ] = None,
) -> None:
    """Download MODEL's config, tokenizer and safetensors weights into the Hugging Face cache and
    print the snapshot path (last line of stdout). Uses the cache when it can: no request for a
    pinned commit, one for a branch; works offline (HF_HUB_OFFLINE=1) from a complete cache."""
    from ..hub import fetch as hub_fetch
    from ..hub import hub_timeout, looks_like_repo_id

    seconds = hub_timeout(timeout) if timeout is not None else None
    if looks_like_repo_id(model):
        repo, rev, trust = model, revision, trust_remote_code
    else:
        from ..presets import get_preset

        preset = get_preset(model)
        repo = preset.repo
        rev = revision or preset.revision
        trust = preset.trust_remote_code or trust_remote_code
    result = hub_fetch(repo, revision=rev, trust_remote_code=trust, quiet=quiet, timeout_s=seconds)
    if not quiet:
        typer.echo(result.summary(), err=True)
    typer.echo(str(result.path))
