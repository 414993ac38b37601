"""What a sweep leaves behind: the terminal table, ``results.json`` and ``heatmap.png``.

The table and the JSON are built from the same ``ProbeResult.cells()``, so they cannot disagree. The
chart module (matplotlib) is imported only when the PNG is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from launcher.errors import printable
from launcher.eval.runfiles import RunDir
from launcher.eval.probe.runner import Cell, ProbeResult

RESULTS_NAME = "results.json"
MAX_RESULTS_BYTES = 64 * 1024 * 1024


def read_results(run_dir: Path, command: str) -> tuple[Path, object]:
    """``(path, parsed JSON)`` of the results.json of a run directory (or that file itself) that
    `launch COMMAND` wrote, for ``--compare``; ``CompareBadRun`` when it cannot be read (a FIFO, a
    device or a socket is refused at once, never waited on)."""
    from launcher.errors import CompareBadRun
    from launcher.eval.runfiles import UnreadableRun, read_regular

    run_dir = Path(run_dir)
    path = run_dir / RESULTS_NAME if run_dir.is_dir() else run_dir
    try:
        raw = read_regular(path, MAX_RESULTS_BYTES)
    except FileNotFoundError:
        raise CompareBadRun(str(run_dir), f"no {RESULTS_NAME} there; give a directory `launch {command}` wrote") from None
    except UnreadableRun as err:
        raise CompareBadRun(str(run_dir), f"cannot read {path.name}: {err.problem}") from None
    try:
        return path, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CompareBadRun(str(run_dir), f"cannot read {path.name}: {err}") from None


def results_bytes(data: dict) -> bytes:
    """How a results.json is written: indented UTF-8 JSON."""
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def show_written(table: str, stream: TextIO, *written: Path, note: str | None = None) -> None:
    """Print the table, then the files a run (or a compare) wrote; ``note`` (on stderr) when they
    went beside ``--out`` because it was taken during the run."""
    print(table, file=stream)
    print(printable(f"wrote {' and '.join(str(p) for p in written)}"), file=stream)
    stream.flush()
    if note:
        print(f"launch: warning: {note}", file=sys.stderr)


HEATMAP_NAME = "heatmap.png"
SCHEMA_VERSION = 1


def cell_text(cell: Cell) -> str:
    """``1.00``; ``0.67!`` when some trials failed with an error; ``ERR`` when all did; ``-`` not run."""
    if cell.accuracy is None:
        return "-"
    if cell.errors == cell.trials:
        return "ERR"
    return f"{cell.accuracy:.2f}" + ("!" if cell.errors else "")


def depth_label(depth: float) -> str:
    """Two decimals, more only when needed (0.125 stays 0.125)."""
    text = f"{depth:.2f}"
    return text if float(text) == depth else f"{depth:.4g}"


def multiple_label(length: int, native: int | None) -> str:
    return f"{length / native:.3g}x" if native else ""


def table_text(lines: list[str]) -> str:
    """Lines of a table as printed: each one line, printable (a model name or an error the server
    sent, a label the user gave, may hold control characters)."""
    return "\n".join(printable(line) for line in lines)


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
        first = next(t for t in result.trials if t.error)
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


@dataclass(frozen=True)
class OutputPaths:
    """What a probe or ppl run wrote."""

    out_dir: Path
    results_json: Path
    chart_png: Path  # heatmap.png (probe), ppl.png (ppl)
    note: str | None = None  # set when --out was taken during the run and the files went beside it

    @property
    def heatmap_png(self) -> Path:
        return self.chart_png


def write_run(out_dir: Path | str, results: dict, chart_name: str, chart: Callable[[], bytes]) -> OutputPaths:
    """``results.json`` (first, so a chart failure cannot lose it), then the chart drawn by ``chart``,
    into a new (or empty) directory, never replacing anything (``runfiles.RunDir``)."""
    with RunDir.claim(out_dir) as run:
        written = run.write(RESULTS_NAME, results_bytes(results))
        png = run.write(chart_name, chart())
    return OutputPaths(run.path, written, png, run.note)


def default_out_dir(now: datetime | None = None, prefix: str = "probe") -> Path:
    """``./probe-YYYYmmdd-HHMMSS`` in the working directory."""
    return Path(f"{prefix}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}")


def write_outputs(result: ProbeResult, out_dir: Path | str) -> OutputPaths:
    """Write ``results.json`` and ``heatmap.png`` (``write_run``)."""
    from launcher.eval.probe.chart import heatmap_png

    return write_run(out_dir, results_dict(result), HEATMAP_NAME, lambda: heatmap_png(result))


def publish(result: ProbeResult, out_dir: Path | str, stream: TextIO) -> OutputPaths:
    """Write the outputs, then print the table and where they are (``probe`` and ``serve --probe``)."""
    return publish_run(format_table(result), lambda: write_outputs(result, out_dir), stream)


def publish_run(table: str, write: Callable[[], OutputPaths], stream: TextIO) -> OutputPaths:
    """``write`` a run's files, then print ``table`` and where they are. When they cannot be written
    the table is still printed before the error, so the numbers of a long run are not lost."""
    from launcher.eval.runfiles import OutNotWritable

    try:
        paths = write()
    except OutNotWritable:
        print(table, file=stream)
        stream.flush()
        raise
    show_written(table, stream, paths.results_json, paths.chart_png, note=paths.note)
    return paths


COMPARE_NAME = "heatmap-compare.png"


def load_result(run_dir: Path) -> ProbeResult:
    """A ``launch probe`` run directory (or its results.json) back as a ProbeResult; anything else is
    refused with ``CompareBadRun``."""
    from dataclasses import fields

    from launcher.errors import CompareBadRun, LaunchError
    from launcher.eval.probe.runner import Trial
    from launcher.eval.probe.settings import ProbeSettings

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
    return result


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
