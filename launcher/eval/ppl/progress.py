"""Progress of a ``launch ppl`` run on stderr: one line as each window starts and is scored."""

from __future__ import annotations

import sys
from typing import TextIO

from launcher.errors import printable
from launcher.eval.ppl.runner import PplEvent


class PplProgress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def __call__(self, event: PplEvent) -> None:
        point = event.point
        line = None
        if event.kind == "begin":
            line = f"launch: {event.message}"
        elif event.kind == "start" and point is not None:
            line = f"[{event.done}/{event.total}] length {point.length}: scoring ..."
        elif event.kind == "done" and point is not None:
            if point.error:
                what = f"failed: {point.error}"
            else:
                what = f"span loss {point.span_loss:.3f}, window loss {point.window_loss:.3f}"
            line = f"[{event.done}/{event.total}] length {point.length}: {what} ({point.seconds:g} s)"
        if line is not None:  # one line, printable whatever the server sent
            self.stream.write(printable(line) + "\n")
        self.stream.flush()
