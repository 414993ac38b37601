"""Command line of ``launch``. Thin: each command checks its flags, calls one library function and
prints the result. Library modules are imported inside the commands, so ``launch --help`` never
imports torch, transformers or lmdeploy.

``main`` is the one place that turns an error into a one-line message and an exit code: a
``LaunchError`` from the library, a usage error from the command-line parser, or one of the few
foreign exceptions that can still reach it (``FOREIGN`` below, the one table of them).

It is also the output edge of every command (``_Edge``): whatever a command writes to stdout or
stderr is written in the stream's encoding, a character it cannot hold (a lone surrogate from a
file name or a config.json that is not UTF-8) as a backslash escape, which inside a JSON string
reads back as the same character; and every message line on stderr (an error, a warning, a note)
is one printable line, whatever a server or a file put in it.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable

import typer

from launcher.cli.app import app
from launcher.errors import DEBUG_ENV, LaunchError, printable

# Each module registers its command(s) on ``app``; this order is the order of `launch --help`.
COMMANDS = ("serve", "plan", "patch", "fetch", "probe", "ppl", "presets", "proxy", "k8s")
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


# A write to stderr that starts with one of these is a message line: shown as one printable line.
MESSAGE_PREFIXES = ("launch: ", "warning: ", "note: ")


class _Edge:
    """``stream`` (sys.stdout or sys.stderr) while a command runs. A write is encoded as the stream
    can hold it (``backslashreplace`` for what it cannot); on stderr (``messages``), a write that
    is a message line (``MESSAGE_PREFIXES``) is made one printable line first. Everything else (a
    progress line rewritten in place, a download bar) passes as written."""

    def __init__(self, stream, *, messages: bool) -> None:
        self.stream = stream
        self.messages = messages

    def write(self, text):
        if isinstance(text, str):
            if self.messages and text.startswith(MESSAGE_PREFIXES):
                body = text.removesuffix("\n")
                text = printable(body) + text[len(body):]
            return self.unedited(text)
        return self.stream.write(text)

    def unedited(self, text: str) -> int:
        """``text`` as the stream's encoding holds it (whatever error handler the stream has: with
        ``surrogateescape`` a lone surrogate would go out as a byte that is not UTF-8), lines kept."""
        if not text.isascii():
            encoding = getattr(self.stream, "encoding", None) or "utf-8"
            text = text.encode(encoding, "backslashreplace").decode(encoding)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _fail(message: str, code: int, *, lines: bool = False) -> None:
    """``launch: error: MESSAGE`` on stderr, and exit. Each line printable; one line unless
    ``lines`` (a LaunchError whose template has more: a server log's tail)."""
    if os.environ.get(DEBUG_ENV):
        import traceback

        traceback.print_exc()
    shown = "\n".join(map(printable, message.split("\n"))) if lines else printable(message)
    text = f"launch: error: {shown}\n"
    if isinstance(sys.stderr, _Edge):
        sys.stderr.unedited(text)
    else:
        sys.stderr.write(text)
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
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Edge(stdout, messages=False), _Edge(stderr, messages=True)
    try:
        _run(args)
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        sys.stdout, sys.stderr = stdout, stderr


def _run(args: list[str]) -> None:
    try:
        code = app(args=args, prog_name="launch", standalone_mode=False)
    except LaunchError as err:
        _fail(str(err), err.exit_code, lines=True)
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
