"""A ppl run as the table and the chart read it (one run, or the runs of a comparison)."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.eval.ppl.runner import PplResult


@dataclass(frozen=True)
class Row:
    length: int
    window_loss: float | None
    span_loss: float | None
    errors: int


@dataclass(frozen=True)
class Run:
    """One run as the table and chart need it: from a fresh result or a results.json."""

    label: str
    native_context: int | None
    span: int
    rows: tuple[Row, ...]
    partial: bool


def run_of(result: PplResult) -> Run:
    rows = tuple(
        Row(length, result.mean_over_texts(length, "window_loss"), result.mean_over_texts(length, "span_loss"),
            sum(1 for p in result.points if p.length == length and p.error))
        for length in result.settings.lengths
    )
    return Run(result.label, result.settings.native_context, result.settings.span, rows,
               result.interrupted or result.stopped_by is not None or not result.complete)
