"""``launch ppl``: the loss of a long text at several context lengths, through lmdeploy's /get_ppl."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .app import app

_Text = str | None  # values are parsed by the library, so a bad one gets one clear line


@app.command()
def ppl(
    runs: Annotated[list[Path] | None, typer.Argument(
        metavar="[RUN_DIR]...", help="With --compare: directories earlier runs wrote.", show_default=False)] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Redraw the results.json of RUN_DIR... on one chart and one table (before/after).")] = False,
    url: Annotated[_Text, typer.Option("--url", metavar="URL", help="The lmdeploy server. Default: http://127.0.0.1:23333.",
                                       show_default=False)] = None,
    api_key: Annotated[_Text, typer.Option("--api-key", metavar="KEY", envvar="LAUNCH_API_KEY", show_envvar=True,
                                           help="Sent as 'Authorization: Bearer KEY'.", show_default=False)] = None,
    text: Annotated[list[Path] | None, typer.Option(
        "--text", metavar="FILE", help="UTF-8 text to score (repeat for several). Default: the bundled Jargon File "
        "excerpt (public domain, ~20k tokens).", show_default=False)] = None,
    lengths: Annotated[_Text, typer.Option(
        "--lengths", metavar="L1,L2,...", help="Window lengths in tokens (4000,8k) or multiples of the native context "
        "(0.5x,2x). Default with a known native context: 0.5x,1x,1.5x,2x.", show_default=False)] = None,
    native: Annotated[_Text, typer.Option("--native", metavar="TOKENS", help="The model's native context in tokens.",
                                          show_default=False)] = None,
    preset: Annotated[_Text, typer.Option("--preset", metavar="NAME", help="Take the native context from this preset.",
                                          show_default=False)] = None,
    tokenizer: Annotated[_Text, typer.Option(
        "--tokenizer", metavar="DIR", help="Local model directory whose tokenizer cuts the windows when the server has "
        "no /v1/encode.", show_default=False)] = None,
    span: Annotated[_Text, typer.Option(
        "--span", metavar="TOKENS", help="The target span: the last tokens of every window, scored at every length. "
        "Default: 512 (at most half the shortest window).", show_default=False)] = None,
    label: Annotated[_Text, typer.Option("--label", metavar="NAME", help="Name of this run on charts. Default: the "
                                         "served model name.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", help="Directory for results.json and ppl.png (with --compare: ppl-compare.png). "
        "Default: ./ppl-<timestamp>/.", show_default=False)] = None,
    timeout: Annotated[_Text, typer.Option("--timeout", metavar="SECONDS", help="Seconds per HTTP request. Default: 600.",
                                           show_default=False)] = None,
) -> None:
    """Measure the language-modelling loss of a long text at growing context lengths.

    Prints a length x loss table (the last --span tokens, and the whole window) and writes
    results.json and ppl.png. Example: launch ppl --native 8192 --lengths 0.5x,1x,1.5x,2x
    """
    from ..errors import BadOption

    if compare:
        if not runs:
            raise BadOption("--compare", "(none)", "give the run directories to compare: launch ppl --compare DIR DIR")
        from ..ppl import compare as draw
        from ..ppl.report import COMPARE_CHART_NAME, check_out_dir, default_out_dir

        out_dir = out if out is not None else default_out_dir(prefix="ppl-compare")
        check_out_dir(out_dir, COMPARE_CHART_NAME)
        draw(list(runs), out_dir, sys.stdout)
        return
    if runs:
        raise BadOption("RUN_DIR", str(runs[0]), "run directories are for --compare; to measure, give --url")

    from ..ppl import measure, publish, settings_from_flags
    from ..ppl.report import check_out_dir, default_out_dir
    from ..probe.settings import preset_native

    native_from_preset = preset_native(preset, native)
    settings = settings_from_flags(url=url, api_key=api_key, lengths=lengths, native=native, texts=text,
                                   tokenizer=tokenizer, span=span, timeout=timeout, label=label,
                                   native_from_preset=native_from_preset)
    out_dir = out if out is not None else default_out_dir()
    check_out_dir(out_dir)

    result = measure(settings)
    publish(result, out_dir, sys.stdout)
    if result.interrupted:
        typer.echo("launch: interrupted; partial results written", err=True)
        raise typer.Exit(130)
    if result.stopped_by is not None:
        raise result.stopped_by
