"""Progress of a sweep on stderr: one self-rewriting line on a terminal, one line per cell otherwise.

The sweep can take many minutes at long lengths, so a terminal user sees which cell is being sent;
a log file (stderr not a terminal) gets one line per finished cell and no carriage returns.
"""

from __future__ import annotations

import sys
from typing import TextIO

from launcher.errors import printable
from launcher.eval.probe.runner import ProgressEvent, Trial


class TerminalProgress:
    """A ``progress`` callback for ``run_probe``."""

    def __init__(self, stream: TextIO | None = None, trials: int = 1) -> None:
        self.stream = stream or sys.stderr
        self.trials = trials
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._cell: list[Trial] = []
        self._dirty = False

    def _clear(self) -> None:
        if self._dirty:
            self.stream.write("\r\033[K")
            self._dirty = False

    def _say(self, text: str, end: str = "\n") -> None:
        """One line; printable, whatever the server sent (a model name, an error message)."""
        self.stream.write(printable(text) + end)

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "begin":
            self._clear()
            self._say(f"launch: {event.message}")
        elif event.kind == "notice":
            self._clear()
            self._say(f"launch: warning: {event.message}")
        elif event.kind == "start" and self.tty:
            self._clear()
            self._say(f"[{event.done}/{event.total}] length {event.length}, depth {event.depth:g}, "
                      f"trial {event.trial_index + 1}/{self.trials} ...", end="")
            self._dirty = True
        elif event.kind == "done" and event.trial is not None:
            self._cell.append(event.trial)
            if event.trial_index + 1 == self.trials:
                self._clear()
                found = sum(t.correct for t in self._cell)
                errors = [t.error for t in self._cell if t.error]
                note = f"  ({len(errors)} failed: {errors[0]})" if errors else ""
                self._say(f"[{event.done}/{event.total}] length {event.length}, depth {event.depth:g}: "
                          f"passkey found {found}/{len(self._cell)}{note}")
                self._cell = []
        self.stream.flush()

    def close(self) -> None:
        self._clear()
        self.stream.flush()
