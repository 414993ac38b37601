"""Command line of ``launch``. Thin: each command checks its flags, calls one library function and
prints the result. Library modules are imported inside the commands, so ``launch --help`` never
imports torch, transformers or lmdeploy.

``main`` is the one place that turns an error into a one-line message and an exit code: a
``LaunchError`` from the library, a usage error from the command-line parser, or one of the few
foreign exceptions that can still reach it (``FOREIGN`` below, the one table of them).
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable

import typer

from ..errors import DEBUG_ENV, LaunchError
from .app import app

# Each module registers its command(s) on ``app``; this order is the order of `launch --help`.
COMMANDS = ("serve", "plan", "patch", "fetch", "probe", "ppl", "presets", "proxy")
for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}")

# Typer keeps its Click copy in a private module: reach the parser's error base class through the
# public ``typer.BadParameter`` instead of importing it.
_ParserError = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")


def _os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}. Free some space and run it again."
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}. Fix the permissions or pick another place."
    if err.errno == errno.ENAMETOOLONG:
        return f"a file name is too long{where[:90]}. Use a shorter path."
    if err.errno == errno.EROFS:
        return f"the file system is read-only{where}. Pick another place."
    return f"{(err.strerror or str(err)).rstrip('.')}{where}."


# Foreign exceptions that can reach ``main``: (class, one line, exit code), the first match wins.
# Library code raises ``LaunchError`` for everything it expects; this is the net below it.
FOREIGN: tuple[tuple[type[BaseException], Callable[[BaseException], str], int], ...] = (
    (OSError, _os_error, 1),  # type: ignore[arg-type]
    (RecursionError, lambda _: "the input is nested too deeply to read.", 1),
    (OverflowError, lambda _: "a number is too large to use; give a smaller value.", 2),
    (MemoryError, lambda _: "out of memory.", 1),
)


def _fail(message: str, code: int) -> None:
    if os.environ.get(DEBUG_ENV):
        import traceback

        traceback.print_exc()
    print(f"launch: error: {message}", file=sys.stderr)
    sys.exit(code)


def _stdout_gone() -> None:
    """The reader of stdout went away (``launch presets | head -1``): stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # `launch` alone: the help on stdout and exit 0, as `launch --help`
        args = ["--help"]
    try:
        code = app(args=args, prog_name="launch", standalone_mode=False)
    except LaunchError as err:
        _fail(str(err), err.exit_code)
    except _ParserError as err:
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else "launch"
        _fail(f"{err.format_message()} (see `{where} --help`)", getattr(err, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        print("launch: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _stdout_gone()
    except Exception as err:
        for kind, describe, exit_code in FOREIGN:
            if isinstance(err, kind):
                _fail(describe(err), exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["FOREIGN", "app", "main"]
