"""``launch probe``: passkey retrieval across lengths and depths against a running server."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from launcher.cli import runs as run_dirs
from launcher.cli.app import app
from launcher.errors import LaunchError


class ProbeBelowThreshold(LaunchError):
    accuracy: float
    threshold: float
    results: str
    message = "overall passkey accuracy {accuracy:.2f} is below --min-accuracy {threshold:g} (details in {results})."


_Text = str | None  # values are parsed by the library, so a bad one gets one clear line
OutOpt = run_dirs.out_option("probe", "heatmap")
TimeoutOpt = run_dirs.timeout_option(300)


@app.command()
@run_dirs.reads_command("Draw the heatmaps of RUN_DIR... side by side in one PNG, and print their tables.")
def probe(
    reads: run_dirs.Reads,
    model: Annotated[_Text, typer.Option("--model", metavar="NAME", help="Model name. Default: the first of GET /v1/models.",
                                         show_default=False)] = None,
    api_key: run_dirs.ApiKeyOpt = None,
    lengths: Annotated[_Text, typer.Option(
        "--lengths", metavar="L1,L2,...", help="Prompt lengths in tokens (4000; 8k = 8,192; 1m = 1,048,576) or multiples of the native context (0.5x,1x,2x). "
        "Default with a known native context: 0.5x,1x,1.5x,2x.", show_default=False)] = None,
    depths: Annotated[_Text, typer.Option(
        "--depths", metavar="D1,D2,...", help="Where the passkey goes: 0 = start of the filler, 1 = its end. "
        "Default: 0,0.25,0.5,0.75,1.", show_default=False)] = None,
    trials: Annotated[_Text, typer.Option("--trials", metavar="N", help="Prompts per cell. Default: 3.",
                                          show_default=False)] = None,
    seed: Annotated[_Text, typer.Option("--seed", metavar="S", help="Same seed, same prompts and passkeys. Default: 0.",
                                        show_default=False)] = None,
    native: Annotated[_Text, typer.Option("--native", metavar="TOKENS", help="The model's native context in tokens (for 'x' "
                                          "lengths and the line on the chart).", show_default=False)] = None,
    preset: run_dirs.PresetOpt = None,
    tokenizer: Annotated[_Text, typer.Option(
        "--tokenizer", metavar="DIR", help="Local model directory whose tokenizer measures lengths when the server has no "
        "tokenize endpoint. Without both, lengths are estimated (~4 characters per token).",
        show_default=False)] = None,
    out: OutOpt = None,
    min_accuracy: Annotated[_Text, typer.Option(
        "--min-accuracy", metavar="A", help="Exit 1 when the overall accuracy is below this (0..1). Default: 0.",
        show_default=False)] = None,
    timeout: TimeoutOpt = None,
    max_tokens: Annotated[_Text, typer.Option("--max-tokens", metavar="N", help="Answer tokens per trial. Default: 64.",
                                              show_default=False)] = None,
) -> None:
    """Check that the served model still finds a passkey hidden at any depth of a long prompt.

    Prints a length x depth accuracy table and writes results.json and heatmap.png. Exits 3 when no
    trial was answered (or the engine stopped answering), 1 below --min-accuracy.
    Example: launch probe --native 32768 --lengths 0.5x,1x,1.5x,2x
    """
    if run_dirs.compared("probe", reads.compare, reads.runs, out):
        return

    from launcher.eval.probe import publish, settings_from_flags, sweep
    from launcher.eval.probe.settings import preset_native

    native_from_preset = preset_native(preset, native)
    settings = settings_from_flags(
        url=reads.url, model=model, api_key=api_key, lengths=lengths, depths=depths, trials=trials, seed=seed,
        native=native, tokenizer=tokenizer, timeout=timeout, max_tokens=max_tokens, min_accuracy=min_accuracy,
        native_from_preset=native_from_preset,
    )
    out_dir = run_dirs.new_out_dir("probe", out)

    result = sweep(settings)
    paths = publish(result, out_dir, sys.stdout)
    run_dirs.end(result, "trial", [t.error for t in result.trials], paths.results_json)
    if result.overall_accuracy < settings.min_accuracy:

        raise ProbeBelowThreshold(result.overall_accuracy, settings.min_accuracy, str(paths.results_json))
