"""What every run of probe and ppl leaves behind, by one rule: ``results.json`` (first, so a chart
failure cannot lose it) and a chart, in a directory launch made (``launcher.eval.runfiles``); the
table printed with what was written; a run's results read back for ``--compare``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from launcher.errors import LaunchError, printable
from launcher.eval.runfiles import RunDir


class CompareBadRun(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "--compare {path}: {problem}"


RESULTS_NAME = "results.json"
MAX_RESULTS_BYTES = 64 * 1024 * 1024


def read_results(run_dir: Path, command: str) -> tuple[Path, object]:
    """``(path, parsed JSON)`` of the results.json of a run directory (or that file itself) that
    `launch COMMAND` wrote, for ``--compare``; ``CompareBadRun`` when it cannot be read (a FIFO, a
    device or a socket is refused at once, never waited on)."""
    from launcher.runtime.paths import UnreadableFile, read_regular

    run_dir = Path(run_dir)
    path = run_dir / RESULTS_NAME if run_dir.is_dir() else run_dir
    try:
        raw = read_regular(path, MAX_RESULTS_BYTES)
    except FileNotFoundError:
        raise CompareBadRun(str(run_dir), f"no {RESULTS_NAME} there; give a directory `launch {command}` wrote") from None
    except UnreadableFile as err:
        raise CompareBadRun(str(run_dir), f"cannot read {path.name}: {err.problem}") from None
    try:
        return path, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CompareBadRun(str(run_dir), f"cannot read {path.name}: {err}") from None


def _strict(value):
    """``value`` with every number JSON cannot hold (inf, nan: a perplexity past exp(709)) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def results_bytes(data: dict) -> bytes:
    """How a results.json is written: indented UTF-8 JSON, strict (a number it cannot hold is null, never
    ``Infinity``, which strict JSON readers refuse)."""
    return (json.dumps(_strict(data), indent=2, allow_nan=False) + "\n").encode("utf-8")


def show_written(table: str, stream: TextIO, *written: Path, note: str | None = None) -> None:
    """Print the table, then the files a run (or a compare) wrote; ``note`` (on stderr) when they
    went beside ``--out`` because it was taken during the run."""
    print(table, file=stream)
    print(printable(f"wrote {' and '.join(str(p) for p in written)}"), file=stream)
    stream.flush()
    if note:
        print(f"launch: warning: {note}", file=sys.stderr)


def table_text(lines: list[str]) -> str:
    """Lines of a table as printed: each one line, printable (a model name or an error the server
    sent, a label the user gave, may hold control characters)."""
    return "\n".join(printable(line) for line in lines)


@dataclass(frozen=True)
class OutputPaths:
    """What a probe or ppl run wrote."""

    out_dir: Path
    results_json: Path
    chart_png: Path  # heatmap.png (probe), ppl.png (ppl)
    note: str | None = None  # set when --out was taken during the run and the files went beside it

    @property
    def heatmap_png(self) -> Path:
        return self.chart_png


def write_run(out_dir: Path | str, results: dict, chart_name: str, chart: Callable[[], bytes]) -> OutputPaths:
    """``results.json`` (first, so a chart failure cannot lose it), then the chart drawn by ``chart``,
    into a new (or empty) directory, never replacing anything (``runfiles.RunDir``)."""
    with RunDir.claim(out_dir) as run:
        written = run.write(RESULTS_NAME, results_bytes(results))
        png = run.write(chart_name, chart())
    return OutputPaths(run.path, written, png, run.note)


def default_out_dir(now: datetime | None = None, prefix: str = "probe") -> Path:
    """``./probe-YYYYmmdd-HHMMSS`` in the working directory."""
    return Path(f"{prefix}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}")


def publish_run(table: str, write: Callable[[], OutputPaths], stream: TextIO) -> OutputPaths:
    """``write`` a run's files, then print ``table`` and where they are. When they cannot be written
    the table is still printed before the error, so the numbers of a long run are not lost."""
    from launcher.eval.runfiles import OutNotWritable

    try:
        paths = write()
    except OutNotWritable:
        print(table, file=stream)
        stream.flush()
        raise
    show_written(table, stream, paths.results_json, paths.chart_png, note=paths.note)
    return paths
