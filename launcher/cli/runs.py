"""What ``launch probe`` and ``launch ppl`` share: the server options, their run directories (where
a run writes, what ``--compare`` reads) and how a run that ended early leaves the command.

Library modules are imported inside the functions, like in the command modules, so that
``launch --help`` stays light.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, TextIO

import typer

from launcher.cli.options import Command, flag, optional, takes
from launcher.errors import LaunchError, printable

RunDirsArg = Annotated[list[Path] | None, typer.Argument(
    metavar="[RUN_DIR]...", help="With --compare: directories earlier runs wrote.", show_default=False)]
UrlOpt = optional(str, "--url", metavar="URL", help="The lmdeploy server. Default: http://127.0.0.1:23333.")
ApiKeyOpt = optional(str, "--api-key", metavar="KEY", envvar="LAUNCH_API_KEY", show_envvar=True,
                     help="Sent as 'Authorization: Bearer KEY'.")
PresetOpt = optional(str, "--preset", metavar="NAME", help="Take the native context from this preset.")


def out_option(command: str, chart: str) -> Any:
    """``--out``: where a run writes (``new_out_dir``) or ``--compare`` draws, ``chart``: its PNG's name."""
    return optional(Path, "--out", "-o", metavar="DIR", help=f"New or empty directory for results.json and "
                    f"{chart}.png (with --compare: {chart}-compare.png). Default: ./{command}-<timestamp>/.")


def timeout_option(seconds: int) -> Any:
    """``--timeout``, ``seconds`` the command's default (its settings read the flag)."""
    return optional(str, "--timeout", metavar="SECONDS", help=f"Seconds per HTTP request. Default: {seconds}.")


@dataclass(frozen=True)
class Reads:
    """What a run of probe or ppl reads: the server at ``url``, or with ``compare`` the directories
    ``runs`` earlier runs wrote."""

    runs: list[Path] | None
    compare: bool
    url: str | None


def reads_command(compare_help: str) -> Callable[[Command], Command]:
    """``takes`` for probe and ppl: RUN_DIR..., --compare (``compare_help``, the command's own) and
    --url, first in the command's options; the body gets them as ``reads``."""
    compare = Annotated[bool, typer.Option("--compare", help=compare_help)]
    return takes("reads", Reads, flag("runs", RunDirsArg), flag("compare", compare, False), flag("url", UrlOpt))


class Ended(Protocol):
    """A result that may have ended early (``ProbeResult``, ``PplResult``)."""

    interrupted: bool
    stopped_by: Exception | None


class NothingAnswered(LaunchError):
    """Every trial (probe) or window (ppl) failed: the run measured nothing, which must not look
    like a pass to a script (exit 3)."""

    what: str  # "trial" or "window"
    total: int
    example: str  # the first failure
    results: str
    exit_code = 3

    def message(self) -> str:
        return printable(f"no {self.what} was answered: all {self.total} failed, e.g. {self.example} "
                         f"(details in {self.results}).")


def compared(command: str, compare: bool, runs: list[Path] | None, out: Path | None) -> bool:
    """With ``--compare``: draw ``RUN_DIR...`` into ``--out`` (checked first) and say True. Without it,
    refuse run directories (they are for ``--compare`` only) and say False: the command runs."""
    import importlib

    from launcher.eval.results import default_out_dir
    from launcher.eval.runfiles import check_out_dir
    from launcher.rules.checks import BadOption

    if not compare:
        if runs:
            raise BadOption("RUN_DIR", str(runs[0]), f"run directories are for --compare; to run `launch {command}`, "
                            "give --url")
        return False
    if not runs:
        raise BadOption("--compare", "(none)", f"give the run directories to compare: launch {command} --compare DIR DIR")
    draw: Callable[[list[Path], Path, TextIO], object] = importlib.import_module(f"launcher.eval.{command}.report").compare
    out_dir = out if out is not None else default_out_dir(prefix=f"{command}-compare")
    draw(list(runs), check_out_dir(out_dir, example=f"./{command}-compare"), sys.stdout)
    return True


def new_out_dir(command: str, out: Path | None) -> Path:
    """Where a new run writes (``--out``, else ``./COMMAND-<timestamp>``), checked before the run:
    a new directory or an empty one (``probe.runfiles.check_out_dir``)."""
    from launcher.eval.results import default_out_dir
    from launcher.eval.runfiles import check_out_dir

    chosen = out if out is not None else default_out_dir(prefix=command)
    return check_out_dir(chosen, example=f"./{command}-run")


def end(result: Ended, what: str, errors: list[str | None], results: Path) -> None:
    """Leave with 130 after Ctrl-C (the partial results are written), raise what stopped the run, or
    ``NothingAnswered`` (exit 3) when every one of ``errors`` (one per trial or window, None where
    it was answered) is set."""
    if result.interrupted:
        typer.echo("launch: interrupted; partial results written", err=True)
        raise typer.Exit(130)
    if result.stopped_by is not None:
        raise result.stopped_by
    failed = [e for e in errors if e is not None]
    if errors and len(failed) == len(errors):
        raise NothingAnswered(what, len(errors), failed[0].rstrip("."), str(results))
