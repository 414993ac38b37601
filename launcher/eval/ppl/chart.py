"""The long-context loss chart: x = window length (tokens), y = loss, one line per run.

Solid lines: the loss of the fixed target span at the end of each window (the curve the
long-context papers show); dashed, lighter: the mean over the whole window. The native context is a
vertical line. Drawn on a bare ``Figure`` with the Agg canvas, never through pyplot (no display, no
global state), and imported only when a PNG is written. A loss or length the chart cannot place
(``charts.drawable``: 1e308, an infinity) is left off it, and a line at the bottom says how many.
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from launcher.eval.charts import drawable, left_off_note, plain, png_bytes
from launcher.eval.ppl.runs import Run

WIDTH_IN, HEIGHT_IN, DPI = 10.0, 6.0, 100
CHART_SIZE_PX = (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def chart_png(runs: list[Run], title: str) -> bytes:
    return png_bytes(chart_figure(runs, title))


def _placed(points: list[tuple[int, float]], left_off: list[int]) -> list[tuple[int, float]]:
    """The ``(length, loss)`` points a chart can place; the count of the others is added to ``left_off``."""
    kept = [(x, y) for x, y in points if drawable(x) and drawable(y)]
    left_off[0] += len(points) - len(kept)
    return kept


def chart_figure(runs: list[Run], title: str) -> Figure:
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.09, 0.12, 0.88, 0.72))
    lengths = sorted({row.length for run in runs for row in run.rows if drawable(row.length)})
    left_off = [0]
    for index, run in enumerate(runs):
        colour = COLOURS[index % len(COLOURS)]
        span = _placed([(r.length, r.span_loss) for r in run.rows if r.span_loss is not None], left_off)
        window = _placed([(r.length, r.window_loss) for r in run.rows if r.window_loss is not None], left_off)
        partial = " (partial)" if run.partial else ""
        if span:
            ax.plot(*zip(*span), marker="o", linewidth=2.5, markersize=7, color=colour,
                    label=plain(f"{run.label}{partial}: last {run.span} tokens"))
        if window:
            ax.plot(*zip(*window), marker=".", linewidth=1.5, linestyle="--", color=colour, alpha=0.55,
                    label=plain(f"{run.label}: whole window"))
    natives = sorted({run.native_context for run in runs if run.native_context and drawable(run.native_context)})
    for native in natives:
        ax.axvline(native, color="#1a1a1a", linestyle=":", linewidth=2)
        ax.annotate(f"native context {native:,}", xy=(native, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(5, 8), textcoords="offset points", fontsize=10, color="#1a1a1a",
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "#1a1a1a"})
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths], fontsize=10)
    ax.margins(x=0.08)
    ax.set_xlabel("window length (tokens of context, the target span included)", fontsize=11)
    ax.set_ylabel("mean next-token loss (nats; lower is better)", fontsize=11)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run with nothing scored draws no line
        ax.legend(fontsize=9, loc="upper left")
    fig.suptitle(plain(title), fontsize=14, fontweight="bold", y=0.97)
    fig.text(0.5, 0.895, "solid: the same last tokens of the text with more and more context before them; "
             "dashed: mean over the whole window", ha="center", fontsize=10, color="#333333")
    note = left_off_note(left_off[0])
    if note:
        fig.text(0.5, 0.015, note, ha="center", fontsize=10, color="#b00020")
    return fig
