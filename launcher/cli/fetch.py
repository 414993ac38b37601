"""`launch fetch`: download a checkpoint (only what serving needs) into the Hugging Face cache."""

from __future__ import annotations

from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.cli.options import TrustOpt, number
from launcher.rules import limits
from launcher.rules.checks import HUB_TIMEOUT_ENV, HUB_TIMEOUT_S

HUB_DEFAULT = f"${HUB_TIMEOUT_ENV}, else {HUB_TIMEOUT_S:g}"


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
    trust_remote_code: TrustOpt = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bars and no summary: print only the path."),
    ] = False,
    timeout: number(limits.SECONDS, "--timeout", metavar="SECONDS", example=HUB_TIMEOUT_S, default=HUB_DEFAULT,
                    help="Give up when the hub does not answer a request or list the repo's files within this many "
                    "seconds, or a download makes no progress for that long (a stalled file is also bounded by "
                    "huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT).") = None,
) -> None:
    """Download what serving MODEL needs into the Hugging Face cache; print the snapshot path.

    Config, tokenizer and safetensors weights only. Uses the cache when it can: no request for a
    pinned commit, one for a branch; works offline (HF_HUB_OFFLINE=1) from a complete cache.
    """
    from launcher.model.source import Fetching, resolve
    from launcher.rules import checks

    if revision is not None:
        checks.revision("--revision", revision)  # '' is refused here, not read as "the default"
    seconds = checks.hub_timeout(timeout) if timeout is not None else None
    how = Fetching(revision=revision, quiet=quiet, timeout_s=seconds, trust_remote_code=trust_remote_code)
    source = resolve(model, need_files=True, fetching=how)
    typer.echo(str(source.path))
