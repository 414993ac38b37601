"""The needle-in-a-haystack style heatmap: x = prompt length, y = passkey depth, colour = accuracy.

Drawn on a bare ``Figure`` with the Agg canvas, never through pyplot, so it needs no display, keeps
no global state and cannot switch the backend of a process that embeds it (``launch serve --probe``).
Imported only when a PNG is written, so the CLI does not pay for matplotlib otherwise.
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from launcher.eval.charts import plain, png_bytes
from launcher.eval.probe.labels import cell_text, multiple_label
from launcher.eval.probe.runner import ProbeResult

WIDTH_IN, HEIGHT_IN, DPI = 12.0, 7.0, 100
HEATMAP_SIZE_PX = (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))  # (width, height) of heatmap.png
AXES_RECT = (0.08, 0.14, 0.78, 0.70)  # the cells' area: left, bottom, width, height (figure fractions)

# Red (never found) -> amber -> green (always found), the palette of the usual haystack charts.
ACCURACY_CMAP = LinearSegmentedColormap.from_list("accuracy", ["#e8414f", "#f2c14e", "#1fae74"])
ERROR_COLOUR = "#8c8c8c"
NOT_RUN_COLOUR = "#f2f2f2"


def _length_label(length: int, native: int | None) -> str:
    text = f"{length:,}"
    return f"{text}\n({multiple_label(length, native)})" if native else text


def _native_x(lengths: tuple[int, ...], native: int) -> float:
    """The column boundary between lengths within the native context and lengths beyond it."""
    return sum(1 for length in lengths if length <= native) - 0.5


def draw_cells(ax, result: ProbeResult, font: float, tick_font: float = 11) -> None:
    """The length x depth grid of ``result`` on ``ax`` (one heatmap, or one panel of a comparison)."""
    s = result.settings
    n_x, n_y = len(s.lengths), len(s.depths)
    for ix, length in enumerate(s.lengths):
        for iy, depth in enumerate(s.depths):
            cell = result.cell(length, depth)
            text = cell_text(cell)
            if cell.accuracy is None:
                colour, text = NOT_RUN_COLOUR, "not run"
            elif text == "ERR":
                colour = ERROR_COLOUR
                status = next((t.http_status for t in result.trials
                               if t.length == length and t.depth == depth and t.http_status), None)
                text = f"ERR\nHTTP {status}" if status else text
            else:
                colour = ACCURACY_CMAP(cell.accuracy)
            ax.add_patch(Rectangle((ix - 0.5, iy - 0.5), 1, 1, facecolor=colour, edgecolor="white", linewidth=2))
            ax.text(ix, iy, text, ha="center", va="center", fontsize=font if text != "not run" else font * 0.7,
                    color="#1a1a1a", fontweight="bold")

    ax.set_xlim(-0.5, n_x - 0.5)
    ax.set_ylim(n_y - 0.5, -0.5)  # depth 0 (start of the filler) on top, as in haystack charts
    ax.set_xticks(range(n_x), [_length_label(length, s.native_context) for length in s.lengths], fontsize=tick_font)
    ax.set_yticks(range(n_y), [f"{d:g}" for d in s.depths], fontsize=tick_font)
    estimated = "" if result.lengths_exact else ", ESTIMATED ~4 chars/token"
    ax.set_xlabel(f"prompt length (tokens{estimated})", fontsize=tick_font + 1)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)

    if s.native_context:
        x = _native_x(s.lengths, s.native_context)
        ax.axvline(x, color="#1a1a1a", linestyle="--", linewidth=2.5, clip_on=False)
        ax.text(x, -0.5, f" native context {s.native_context:,} ", ha="center", va="bottom", fontsize=tick_font,
                color="#1a1a1a", bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "#1a1a1a"})


def heatmap_png(result: ProbeResult) -> bytes:
    s = result.settings
    n_x, n_y = len(s.lengths), len(s.depths)
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(AXES_RECT)
    cax = fig.add_axes((0.885, 0.14, 0.022, 0.70))
    font = max(7.0, min(16.0, 150.0 / max(n_x, n_y)))
    draw_cells(ax, result, font)
    ax.set_ylabel("passkey depth (0 = start, 1 = end of the filler)", fontsize=12)

    colourbar = fig.colorbar(_scalar_mappable(), cax=cax)
    colourbar.set_label("accuracy (share of trials that found the passkey)", fontsize=11)

    status = ""
    if result.interrupted or result.stopped_by is not None:
        status = f" - PARTIAL: {len(result.trials)} of {s.planned_trials} trials"
    fig.suptitle(plain(f"Passkey retrieval: {result.model}"), fontsize=16, fontweight="bold", y=0.975)
    fig.text(0.5, 0.905, f"{s.trials} trial(s) per cell, seed {s.seed}, greedy decoding; overall accuracy "
             f"{result.overall_accuracy:.2f}{status}", ha="center", fontsize=12, color="#333333")
    legend = "grey ERR: the server refused or failed every trial of the cell; '!': some trials failed"
    if any(t.error for t in result.trials):
        fig.text(0.5, 0.02, legend, ha="center", fontsize=10, color="#333333")

    return png_bytes(fig)


def _scalar_mappable():
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap=ACCURACY_CMAP)


def comparison_png(results: list[tuple[str, ProbeResult]]) -> bytes:
    """``launch probe --compare``: the heatmaps of several runs side by side, one colour scale."""
    n = len(results)
    width = min(6.0 * n + 1.2, 40.0)
    fig = Figure(figsize=(width, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    left, right, gap = 0.6 / width, 1.0 - 1.1 / width, 0.5 / width
    panel = (right - left - gap * (n - 1)) / n
    for index, (label, result) in enumerate(results):
        ax = fig.add_axes((left + index * (panel + gap), 0.14, panel, 0.66))
        s = result.settings
        font = max(7.0, min(14.0, 90.0 / max(len(s.lengths), len(s.depths))))
        draw_cells(ax, result, font, tick_font=9)
        if index == 0:
            ax.set_ylabel("passkey depth (0 = start, 1 = end)", fontsize=10)
        partial = " (partial)" if not result.complete else ""
        ax.set_title(f"{plain(label)}{partial}\naccuracy {result.overall_accuracy:.2f}, {s.trials} trial(s) per cell",
                     fontsize=11, pad=26)
    cax = fig.add_axes((right + 0.25 / width, 0.14, 0.25 / width, 0.66))
    colourbar = fig.colorbar(_scalar_mappable(), cax=cax)
    colourbar.set_label("accuracy", fontsize=10)
    fig.suptitle("Passkey retrieval, compared", fontsize=15, fontweight="bold", y=0.98)
    return png_bytes(fig)
