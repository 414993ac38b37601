"""How a probe cell, a depth and a length read, the same in the table and on the chart."""

from __future__ import annotations

from launcher.eval.probe.runner import Cell


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
