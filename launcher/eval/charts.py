"""What every chart of launch shares: matplotlib text that shows as written, and a figure as PNG bytes."""

from __future__ import annotations

import io
import warnings

from matplotlib.figure import Figure

from launcher.errors import printable


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
