"""Command line of ``launch``. Thin: each command checks its flags, calls one library function and
prints the result. Library modules are imported inside the commands, so ``launch --help`` never
imports torch, transformers or lmdeploy.

``main`` is the one place that turns an error into a one-line message and an exit code: a
``LaunchError`` from the library, or a usage error from the command-line parser.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from ..errors import DEBUG_ENV, LaunchError
from .app import app

# Each module registers its command(s) on ``app``; this order is the order of `launch --help`.
COMMANDS = ("serve", "plan", "patch", "fetch", "probe", "ppl", "presets")
for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}")

# Typer keeps its Click copy in a private module: reach the parser's error base class through the
# public ``typer.BadParameter`` instead of importing it.
_ParserError = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")


def _fail(message: str, code: int) -> None:
    if os.environ.get(DEBUG_ENV):
        import traceback

        traceback.print_exc()
    print(f"launch: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, prog_name="launch", standalone_mode=False)
    except LaunchError as err:
        _fail(str(err), err.exit_code)
    except _ParserError as err:
        if not err.format_message():  # `launch` alone: the help was printed
            sys.exit(0)
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else "launch"
        _fail(f"{err.format_message()} (see `{where} --help`)", getattr(err, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        print("launch: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
