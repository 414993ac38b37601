"""What the user sees while the server loads its weights: the supervisor's only output before ready.

On a terminal: one line rewritten in place, elapsed seconds and the server's last log line. Else (a
log file, CI): one line every ``every_s`` seconds, so logs stay readable.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from launcher.errors import printable

PROGRESS_EVERY_S = 10.0


class StartProgress:
    """Progress of one server start, written to ``stream``; a broken stream never stops the server."""

    def __init__(self, stream: TextIO, *, log_path: Path, every_s: float = PROGRESS_EVERY_S) -> None:
        self.stream = stream
        self.every_s = every_s
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._last_text = ""
        self._next_line_at = every_s
        self._write(f"launch: starting the server; its log: {log_path}\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not stop the server

    def update(self, elapsed: float, last_line: str) -> None:
        last_line = printable(last_line)  # the server's own log line: no control character reaches the terminal
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            text = f"launch: loading… {elapsed:4.0f} s | {last_line}"[:width]
            if text != self._last_text:
                self._write("\r\x1b[K" + text)
                self._last_text = text
        elif elapsed >= self._next_line_at:
            self._write(f"launch: still starting after {elapsed:.0f} s: {last_line}\n")
            self._next_line_at = elapsed + self.every_s

    def clear(self) -> None:
        if self.tty and self._last_text:
            self._write("\r\x1b[K")
            self._last_text = ""

    def done(self, elapsed: float) -> None:
        self.clear()
        self._write(f"launch: the server is healthy after {elapsed:.0f} s\n")


def teller(stream: TextIO) -> Callable[[str], None]:
    """``say(line)``: ``launch: line`` on ``stream`` at once; a closed or broken stream is ignored (what
    launch says while it supervises must never stop a server)."""

    def say(line: str) -> None:
        try:
            print(f"launch: {line}", file=stream, flush=True)
        except (OSError, ValueError):
            pass

    return say
