"""What a sweep leaves behind: the terminal table, ``results.json`` and ``heatmap.png``.

The table and the JSON are built from the same ``ProbeResult.cells()``, so they cannot disagree. The
chart module (matplotlib) is imported only when the PNG is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from launcher.eval.probe.labels import cell_text, depth_label, multiple_label
from launcher.eval.probe.runner import ProbeResult
from launcher.eval.results import OutputPaths, publish_run, read_results, show_written, table_text, write_run
from launcher.eval.runfiles import RunDir

HEATMAP_NAME = "heatmap.png"
SCHEMA_VERSION = 1


def format_table(result: ProbeResult) -> str:
    """Depth rows x length columns of accuracy, with a header and the notes a reader needs."""
    s = result.settings
    lines = [
        (f"Passkey retrieval, model {result.model}: {s.trials} trial(s) per cell, seed {s.seed}, "
         f"lengths measured by {result.token_counting}"),
    ]
    if not result.lengths_exact:
        lines.append("NOTE: lengths are estimates, not the model's tokens (no tokenize endpoint, no --tokenizer)")
    heads = [f"{length}" for length in s.lengths]
    subs = [multiple_label(length, s.native_context) for length in s.lengths]
    width = max(7, *(len(h) for h in heads))
    lines.append(f"{'depth':<8}" + "".join(f"{h:>{width + 2}}" for h in heads) + "   <- length (tokens)")
    if s.native_context:
        lines.append(f"{'':<8}" + "".join(f"{x:>{width + 2}}" for x in subs)
                     + f"   <- x native context {s.native_context}")
    marks = set()
    for depth in s.depths:
        texts = [cell_text(result.cell(length, depth)) for length in s.lengths]
        marks.update(t for t in texts if t in ("ERR", "-") or t.endswith("!"))
        lines.append(f"{depth_label(depth):<8}" + "".join(f"{t:>{width + 2}}" for t in texts))
    correct = sum(t.correct for t in result.trials)
    lines.append(f"overall accuracy {result.overall_accuracy:.2f} ({correct}/{len(result.trials)} found; "
                 "errors count as misses)")
    if any(m == "ERR" or m.endswith("!") for m in marks):
        first = next(t for t in result.trials if t.error is not None)
        lines.append(f"ERR / !: all / some trials of the cell failed, e.g. length {first.length}: {first.error}")
    if "-" in marks:
        lines.append("-: not run")
    if result.interrupted:
        lines.append(f"interrupted: {len(result.trials)} of {s.planned_trials} trials ran")
    if result.stopped_by is not None:
        lines.append(f"stopped early: {result.stopped_by}")
    return table_text(lines)


def results_dict(result: ProbeResult) -> dict:
    s = result.settings
    return {
        "version": SCHEMA_VERSION,
        "model": result.model,
        "settings": s.public(),
        "token_counting": {
            "method": result.token_counting,
            "exact": result.lengths_exact,
            "note": None if result.lengths_exact else "lengths are estimates, not the model's tokens",
        },
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "complete": result.complete,
        "interrupted": result.interrupted,
        "stopped_by": str(result.stopped_by) if result.stopped_by is not None else None,
        "overall_accuracy": result.overall_accuracy,
        "cells": [
            {"length": c.length, "depth": c.depth, "trials": c.trials, "correct": c.correct, "errors": c.errors,
             "accuracy": c.accuracy}
            for c in result.cells()
        ],
        "trials": [asdict(t) for t in result.trials],
    }


def write_outputs(result: ProbeResult, out_dir: Path | str) -> OutputPaths:
    """Write ``results.json`` and ``heatmap.png`` (``write_run``)."""
    from launcher.eval.probe.chart import heatmap_png

    return write_run(out_dir, results_dict(result), HEATMAP_NAME, lambda: heatmap_png(result))


def publish(result: ProbeResult, out_dir: Path | str, stream: TextIO) -> OutputPaths:
    """Write the outputs, then print the table and where they are (``probe`` and ``serve --probe``)."""
    return publish_run(format_table(result), lambda: write_outputs(result, out_dir), stream)


COMPARE_NAME = "heatmap-compare.png"


def load_result(run_dir: Path) -> ProbeResult:
    """A ``launch probe`` run directory (or its results.json) back as a ProbeResult; anything else is
    refused with ``CompareBadRun``."""
    from dataclasses import fields

    from launcher.errors import LaunchError
    from launcher.eval.probe.runner import Trial
    from launcher.eval.probe.settings import ProbeSettings
    from launcher.eval.results import CompareBadRun

    run_dir = Path(run_dir)
    path, data = read_results(run_dir, "probe")
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or "overall_accuracy" not in data:
        raise CompareBadRun(str(run_dir), f"{path.name} was not written by `launch probe`")
    names = {f.name for f in fields(Trial)}
    try:
        s = data["settings"]
        settings = ProbeSettings(
            lengths=tuple(s["lengths"]), depths=tuple(s["depths"]), trials=s["trials"], seed=s["seed"],
            native_context=s.get("native_context"), model=s.get("model"))
        trials = [Trial(**{k: v for k, v in t.items() if k in names}) for t in data["trials"]]
        result = ProbeResult(settings, str(data["model"]), str(data["token_counting"]["method"]),
                             bool(data["token_counting"]["exact"]), str(data.get("started_at")), trials,
                             data.get("finished_at"), bool(data.get("interrupted")))
    except (KeyError, TypeError, ValueError, AttributeError, LaunchError):
        raise CompareBadRun(str(run_dir), f"{path.name} lacks the fields of a `launch probe` result") from None
    if any(t.length not in settings.lengths or t.depth not in settings.depths for t in trials):
        raise CompareBadRun(str(run_dir), f"{path.name} has trials outside its own lengths and depths")
    bad = next((name for t in trials for name, ok in _TRIAL_FIELDS.items() if not ok(getattr(t, name))), None)
    if bad is not None:  # a `correct` of 2 or "yes" would draw an accuracy past 1, or none at all
        raise CompareBadRun(str(run_dir), f"{path.name} has a trial whose {bad!r} is not what `launch probe` writes")
    return result


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: object) -> bool:
    return _count(value) or (isinstance(value, float) and math.isfinite(value) and value >= 0)


# What `launch probe` writes in each field of a trial (length and depth are checked against the settings).
_TRIAL_FIELDS = {
    "trial": _count,
    "passkey": lambda v: isinstance(v, str),
    "answer": lambda v: v is None or isinstance(v, str),
    "correct": lambda v: isinstance(v, bool),
    "latency_s": lambda v: v is None or _seconds(v),
    "prompt_tokens": lambda v: v is None or _count(v),
    "measured_tokens": lambda v: v is None or _count(v),
    "filler_words": lambda v: v is None or _count(v),
    "error": lambda v: v is None or (isinstance(v, str) and v != ""),  # a failed trial always says why
    "http_status": lambda v: v is None or _count(v),
}


def compare(run_dirs: list[Path], out_dir: Path, stream: TextIO) -> Path:
    """``launch probe --compare``: the runs' tables, and their heatmaps side by side in one PNG."""
    results = [load_result(d) for d in run_dirs]
    labels = [r.model for r in results]
    labels = [f"{label} ({Path(d).name})" if labels.count(label) > 1 else label for label, d in zip(labels, run_dirs)]
    from launcher.eval.probe.chart import comparison_png

    png = comparison_png(list(zip(labels, results)))
    with RunDir.claim(out_dir) as run:
        chart = run.write(COMPARE_NAME, png)
    show_written("\n".join(f"== {label}\n{format_table(result)}" for label, result in zip(labels, results)),
                 stream, chart, note=run.note)
    return chart
