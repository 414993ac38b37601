"""What a run leaves behind: the terminal table, ``results.json`` and ``ppl.png``; and the same for
several runs side by side (``launch ppl --compare``).

The table, the JSON and the chart are built from the same per-length means, so they cannot
disagree. The chart module (matplotlib) is imported only when a PNG is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from launcher.eval.ppl.runner import PplResult
from launcher.eval.ppl.runs import Row, Run, run_of
from launcher.eval.ppl.windows import perplexity
from launcher.eval.probe.settings import MAX_LENGTH
from launcher.eval.results import (
    CompareBadRun,
    OutputPaths,
    publish_run,
    read_results,
    show_written,
    table_text,
    write_run,
)
from launcher.eval.runfiles import RunDir
from launcher.rules.configcheck import INT32_MAX

CHART_NAME = "ppl.png"
COMPARE_CHART_NAME = "ppl-compare.png"
KIND = "launch-ppl"
SCHEMA_VERSION = 1


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if value < 1e5 else f"{value:.3g}"


def format_runs(runs: list[Run]) -> str:
    """One row per length, per run: loss and perplexity of the target span and of the whole window."""
    native = next((r.native_context for r in runs if r.native_context), None)
    lines = []
    width = min(48, max(6, *(len(run.label) + 2 for run in runs)))
    head = f"{'run':<{width}}{'length':>9}{'x native':>10}{'span loss':>11}{'span ppl':>10}{'window loss':>13}{'window ppl':>12}"
    lines.append(head)
    for run in runs:
        for row in run.rows:
            mark = ""
            if run.native_context:
                mark = f"{row.length / run.native_context:.3g}x" + ("*" if row.length <= run.native_context else " ")
            err = "  ERR" if row.errors and row.span_loss is None else ("  !" if row.errors else "")
            lines.append(f"{run.label[:width - 1]:<{width}}{row.length:>9}{mark:>10}{_num(row.span_loss):>11}"
                         f"{_num(perplexity(row.span_loss), 2):>10}{_num(row.window_loss):>13}"
                         f"{_num(perplexity(row.window_loss), 2):>12}{err}")
    spans = sorted({r.span for r in runs})
    lines.append(f"span: the last {', '.join(map(str, spans))} tokens of the text, the same tokens at every length; "
                 "window: the mean over the whole window (mean next-token loss, natural log; ppl = exp(loss))")
    if native:
        lines.append("*: within the native context")
    if any(row.errors for run in runs for row in run.rows):
        lines.append("ERR / !: all / some texts of the length failed (see results.json)")
    return table_text(lines)


def format_table(result: PplResult) -> str:
    s = result.settings
    lines = [f"Long-context loss, model {result.model}: tokens by {result.tokenization}; texts: "
             + "; ".join(f"{src} ({n} tokens)" for src, n in result.text_tokens.items())]
    lines.extend(format_runs([run_of(result)]).splitlines())
    errors = [p for p in result.points if p.error]
    if errors:
        lines.append(f"e.g. length {errors[0].length}: {errors[0].error}")
    if result.interrupted:
        lines.append(f"interrupted: {len(result.points)} of {result.planned} windows scored")
    if result.stopped_by is not None:
        lines.append(f"stopped early: {result.stopped_by}")
    if s.native_context is None:
        lines.append("(give --native N or --preset NAME to mark the native context)")
    return table_text(lines)


def results_dict(result: PplResult) -> dict:
    run = run_of(result)
    return {
        "kind": KIND,
        "version": SCHEMA_VERSION,
        "label": result.label,
        "model": result.model,
        "settings": result.settings.public(),
        "tokenization": result.tokenization,
        "texts": [{"source": src, "tokens": n} for src, n in result.text_tokens.items()],
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "complete": result.complete,
        "interrupted": result.interrupted,
        "stopped_by": str(result.stopped_by) if result.stopped_by is not None else None,
        "lengths": [
            {"length": r.length, "span_loss": r.span_loss, "span_ppl": perplexity(r.span_loss),
             "window_loss": r.window_loss, "window_ppl": perplexity(r.window_loss), "errors": r.errors}
            for r in run.rows
        ],
        "points": [asdict(p) for p in result.points],
    }


def _finite_or_none(value: object, where: str, path: Path) -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int past any float
        number = math.nan
    if not math.isfinite(number):
        raise CompareBadRun(str(path), f"{where} is not a finite number")
    return number


def _whole(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def load_run(run_dir: Path) -> Run:
    """A ``launch ppl`` run directory (or its results.json) -> Run; anything else is refused."""
    run_dir = Path(run_dir)
    path, data = read_results(run_dir, "ppl")
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise CompareBadRun(str(run_dir), f"{path.name} was not written by `launch ppl`")
    try:
        settings = data["settings"]
        native = settings.get("native_context")
        span = settings["span"]
        lengths = [item["length"] for item in data["lengths"]]
        rows = tuple(
            Row(item["length"], _finite_or_none(item.get("window_loss"), "window_loss", path),
                _finite_or_none(item.get("span_loss"), "span_loss", path), int(item.get("errors") or 0))
            for item in data["lengths"]
        )
        label = str(data.get("label") or data.get("model") or run_dir.name)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CompareBadRun(str(run_dir), f"{path.name} lacks the fields of a `launch ppl` result") from None
    if native is not None and not _whole(native, INT32_MAX):
        raise CompareBadRun(str(run_dir), f"settings.native_context is not a whole number of tokens, 1..{INT32_MAX}")
    if not all(_whole(length, MAX_LENGTH) for length in lengths):
        raise CompareBadRun(str(run_dir), f"a length is not a whole number of tokens, 1..{MAX_LENGTH}")
    if isinstance(span, bool) or not isinstance(span, int) or span < 1 or not rows:
        raise CompareBadRun(str(run_dir), f"{path.name} holds no lengths or no valid span")
    return Run(label[:80], native, span, rows, not data.get("complete", False))


def distinct_labels(runs: list[Run], dirs: list[Path]) -> list[Run]:
    """Runs with the same label get their directory's name added, so the legend tells them apart."""
    from dataclasses import replace

    labels = [r.label for r in runs]
    return [replace(r, label=f"{r.label} ({Path(d).name})") if labels.count(r.label) > 1 else r
            for r, d in zip(runs, dirs)]


def write_outputs(result: PplResult, out_dir: Path | str) -> OutputPaths:
    """``results.json``, then ``ppl.png`` (``probe.report.write_run``)."""
    from launcher.eval.ppl.chart import chart_png

    return write_run(out_dir, results_dict(result), CHART_NAME,
                     lambda: chart_png([run_of(result)], title=f"Long-context loss: {result.label}"))


def publish(result: PplResult, out_dir: Path | str, stream: TextIO) -> OutputPaths:
    """Write the outputs, then print the table and where they are (``ppl`` and ``serve --probe``)."""
    return publish_run(format_table(result), lambda: write_outputs(result, out_dir), stream)


def compare(run_dirs: list[Path], out_dir: Path, stream: TextIO) -> Path:
    """``launch ppl --compare``: several runs on one chart and one table."""
    runs = distinct_labels([load_run(d) for d in run_dirs], run_dirs)
    from launcher.eval.ppl.chart import chart_png

    png = chart_png(runs, title="Long-context loss, compared")
    with RunDir.claim(out_dir) as run:
        chart = run.write(COMPARE_CHART_NAME, png)
    show_written(format_runs(runs), stream, chart, note=run.note)
    return chart
