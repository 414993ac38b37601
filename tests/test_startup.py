"""`launch --help`, `presets` and `plan` never import torch, transformers or lmdeploy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "lmdeploy", "matplotlib", "pydantic")

BLOCKER = r"""
import atexit, importlib.abc, json, sys
HEAVY = {heavy!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{{name}} is made unimportable by the test")
        return None

sys.meta_path.insert(0, Block())
atexit.register(lambda: print("MODULES=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)),
                              file=sys.stderr))
from launcher.cli import main
main({argv!r})
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["presets"], ["plan", "internlm-chat-7b", "--factor", "2", "--json"], ["plan", "--help"]],
)
def test_commands_work_with_heavy_modules_unimportable(argv):
    code = BLOCKER.format(heavy=HEAVY, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stderr.split("MODULES=")[-1])
    assert modules == []
    assert result.stdout.strip()
    if argv[0] == "plan" and "--json" in argv:
        assert json.loads(result.stdout)["session_len"] == 4096


def test_help_lists_the_commands(launch):
    result = launch("--help")
    assert result.returncode == 0
    for command in ("plan", "patch", "presets"):
        assert command in result.stdout
