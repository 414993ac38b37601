"""What every chart of launch shares: the numbers it can place, matplotlib text that shows as
written, and a figure as PNG bytes.

The one rule for numbers: a chart places only a finite number within ``CHART_LIMIT`` of zero
(``drawable``). Any other value a run holds (a server's loss of 1e308, an infinity) is left off
the chart, the chart says how many were (``left_off_note``), and the table and results.json keep
them: a chart never fails a run that measured something, and never hides that it left a value out.
The probe's heatmap places no measured number on an axis (its cells are categories, coloured by a
share of trials in 0..1), so there the rule holds by what ``--compare`` accepts.
"""

from __future__ import annotations

import io
import math
import warnings

from matplotlib.figure import Figure

from launcher.errors import printable

# Far past any loss (nats) or length (tokens) launch measures, and far below where matplotlib's axis
# arithmetic (margins, tick steps) overflows a float: two windows at 1e308 ended in
# ``ValueError: arange: cannot compute length`` from its ticker.
CHART_LIMIT = 1e15


def drawable(value: object) -> bool:
    """Whether a chart can place ``value`` on an axis: an int or float (not a bool), finite, within
    ``CHART_LIMIT`` of zero (an int past any float, 10**400, is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and abs(number) <= CHART_LIMIT


def left_off_note(count: int) -> str | None:
    """What a chart prints when it left ``count`` values off (None when it left none)."""
    if not count:
        return None
    values = "value" if count == 1 else "values"
    return (f"{count} {values} too large to draw (not finite, or past {CHART_LIMIT:.0e}) left off the chart; "
            "the table and results.json have them")


def plain(text: str) -> str:
    """Text from a server or the user as a chart shows it: printable, and a ``$`` is a dollar sign,
    not the start of matplotlib's math notation."""
    return printable(text).replace("$", r"\$")


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (written to disk by ``runfiles.RunDir``, never through a path). A
    character the font lacks (a model name in another script) is drawn as a box, without the
    two-line warning matplotlib would print on stderr for each."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()
