"""Command line of ``launch``. Thin: each command checks its flags, calls one library function and
prints the result. Library modules are imported inside the commands, so ``launch --help`` never
imports torch, transformers or lmdeploy.

``main`` is the one place that turns a ``LaunchError`` into a one-line message and an exit code.
"""

from __future__ import annotations

import os
import sys

from ..errors import DEBUG_ENV, LaunchError
from . import fetch as _fetch  # noqa: F401
from . import patch as _patch  # noqa: F401
from . import plan as _plan  # noqa: F401
from . import presets as _presets  # noqa: F401
from . import probe as _probe  # noqa: F401

# Each module registers its commands on ``app``.
from . import serve as _serve  # noqa: F401
from .app import app


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="launch")
    except LaunchError as err:
        if os.environ.get(DEBUG_ENV):
            import traceback

            traceback.print_exc()
        print(f"launch: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("launch: interrupted", file=sys.stderr)
        sys.exit(130)


__all__ = ["app", "main"]
