"""``launch ppl``: the loss of a long text at several context lengths, through lmdeploy's /get_ppl."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from launcher.cli import runs as run_dirs
from launcher.cli.app import app

_Text = str | None  # values are parsed by the library, so a bad one gets one clear line
OutOpt = run_dirs.out_option("ppl", "ppl")
TimeoutOpt = run_dirs.timeout_option(600)


@app.command()
@run_dirs.reads_command("Redraw the results.json of RUN_DIR... on one chart and one table (before/after).")
def ppl(
    reads: run_dirs.Reads,
    api_key: run_dirs.ApiKeyOpt = None,
    text: Annotated[list[Path] | None, typer.Option(
        "--text", metavar="FILE", help="UTF-8 text to score (repeat for several). Default: the bundled Jargon File "
        "excerpt (public domain, ~20k tokens).", show_default=False)] = None,
    lengths: Annotated[_Text, typer.Option(
        "--lengths", metavar="L1,L2,...", help="Window lengths in tokens (4000; 8k = 8,192) or multiples of the native context "
        "(0.5x,2x). Default with a known native context: 0.5x,1x,1.5x,2x.", show_default=False)] = None,
    native: Annotated[_Text, typer.Option("--native", metavar="TOKENS", help="The model's native context in tokens.",
                                          show_default=False)] = None,
    preset: run_dirs.PresetOpt = None,
    tokenizer: Annotated[_Text, typer.Option(
        "--tokenizer", metavar="DIR", help="Local model directory whose tokenizer cuts the windows when the server has "
        "no /v1/encode.", show_default=False)] = None,
    span: Annotated[_Text, typer.Option(
        "--span", metavar="TOKENS", help="The target span: the last tokens of every window, scored at every length. "
        "Default: 512 (at most half the shortest window).", show_default=False)] = None,
    label: Annotated[_Text, typer.Option("--label", metavar="NAME", help="Name of this run on charts. Default: the "
                                         "served model name.", show_default=False)] = None,
    out: OutOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Measure the language-modelling loss of a long text at growing context lengths.

    Prints a length x loss table (the last --span tokens, and the whole window) and writes
    results.json and ppl.png; exits 3 when no window was scored (or the engine stopped answering).
    Example: launch ppl --native 8192 --lengths 0.5x,1x,1.5x,2x
    """
    if run_dirs.compared("ppl", reads.compare, reads.runs, out):
        return

    from launcher.eval.ppl import measure, publish, settings_from_flags
    from launcher.eval.probe.settings import preset_native

    native_from_preset = preset_native(preset, native)
    settings = settings_from_flags(url=reads.url, api_key=api_key, lengths=lengths, native=native, texts=text,
                                   tokenizer=tokenizer, span=span, timeout=timeout, label=label,
                                   native_from_preset=native_from_preset)
    out_dir = run_dirs.new_out_dir("ppl", out)

    result = measure(settings)
    paths = publish(result, out_dir, sys.stdout)
    run_dirs.end(result, "window", [p.error for p in result.points], paths.results_json)
