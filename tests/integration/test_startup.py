"""`launch --help`, `presets` and `plan` never import torch, transformers or lmdeploy; presets are read
through msgspec (small), never pydantic (~0.15 s to import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

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
                              "MSGSPEC=" + json.dumps("msgspec" in sys.modules), file=sys.stderr))
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
    modules = json.loads(result.stderr.split("MODULES=")[-1].split(" MSGSPEC=")[0])
    assert modules == []
    reads_presets = "--help" not in argv  # presets and plan PRESET read preset files; --help reads none
    assert json.loads(result.stderr.split("MSGSPEC=")[-1]) is reads_presets
    assert result.stdout.strip()
    if argv[0] == "plan" and "--json" in argv:
        assert json.loads(result.stdout)["session_len"] == 4096


def test_help_lists_the_commands(launch):
    result = launch("--help")
    assert result.returncode == 0
    for command in ("plan", "patch", "presets"):
        assert command in result.stdout


def test_bare_launch_prints_the_help_and_exits_0(launch):
    bare, helped = launch(), launch("--help")
    assert bare.returncode == 0 and bare.stderr == ""
    assert bare.stdout == helped.stdout and "Commands:" in bare.stdout


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`launch presets | head -0`: the reader is gone before launch writes; no traceback."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "launcher", "presets"], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=60, check=False)
    finally:
        os.close(write)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


@pytest.mark.parametrize(("raised", "needle", "code"), [
    (PermissionError(13, "Permission denied", "/srv/models/x"), "permission denied: /srv/models/x.", 1),
    (OSError(28, "No space left on device", "/tmp/out"), "no space left on the device: /tmp/out.", 1),
    (OSError(36, "File name too long", "/tmp/" + "a" * 300), "a file name is too long", 1),
    (OSError(5, "Input/output error"), "Input/output error.", 1),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply", 1),
    (OverflowError("int too large to convert to float"), "too large", 2),
])
def test_foreign_errors_become_one_line(monkeypatch, capsys, raised, needle, code):
    from launcher import cli

    def app(**_):
        raise raised

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as caught:
        cli.main(["plan", "x"])
    err = capsys.readouterr().err
    assert caught.value.code == code
    assert err.count("\n") == 1 and err.startswith("launch: error: ") and needle in err and len(err) < 200


def test_other_exceptions_are_not_hidden(monkeypatch):
    from launcher import cli

    def app(**_):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(KeyError):
        cli.main(["plan", "x"])
