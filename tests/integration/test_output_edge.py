"""The output edge (launcher/cli/__init__.py main, launcher/errors.py): whatever text a config, a
file name, a path or a server holds, every command writes it (stdout and stderr) in its stream's
encoding, a plan's JSON stays JSON, and every error and warning line stays one printable line
(issues 16 and 17)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.errors import LaunchError
from tests.conftest import LLAMA, REPO, tree_state
from tests.support.servers import JSONHandler, serving, url_of
from tests.unit.rules.test_limits import run
from tests.unit.test_errors import _all_errors

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

# Text that is not UTF-8: a lone surrogate (what Python makes of a byte of a non-UTF-8 file name,
# U+DC80..U+DCFF, or what a JSON file's "\ud800" escape reads as), placed where launch reads text.
SURROGATE = st.one_of(st.integers(0xDC80, 0xDCFF), st.integers(0xD800, 0xDBFF)).map(chr)
PLACES = ("config value", "config key", "rope key", "model file name", "model path")
COMMANDS = (("plan", "--gpu-memory", "80"), ("plan", "--gpu-memory", "80", "--json"), ("patch",),
            ("serve", "--gpu-memory", "80", "--dry-run"), ("serve", "--gpu-memory", "80", "--dry-run", "--json"))


def make_model(root: Path, place: str, odd: str) -> tuple[Path, dict]:
    config = dict(LLAMA, rope_scaling={"type": "dynamic", "factor": 2.0})
    if place == "config value":
        config["model_type"] = f"llama{odd}"
    elif place == "config key":
        config[f"x{odd}"] = 1
    elif place == "rope key":
        config["rope_scaling"] = {"type": "dynamic", "factor": 2.0, f"k{odd}": 1}
    directory = Path(os.fsdecode(os.fsencode(root) + b"/m\xe9odel")) if place == "model path" else root / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))  # ASCII: the surrogate as its JSON escape
    (directory / "model.safetensors").write_bytes(b"\0" * 64)
    if place == "model file name":
        Path(os.fsdecode(os.fsencode(directory) + b"/tok\xe9n.json")).write_bytes(b"{}")
    return directory, config


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(place=st.sampled_from(PLACES), command=st.sampled_from(COMMANDS), odd=SURROGATE)
def test_text_that_is_not_utf8_is_written_by_every_command_without_a_traceback(tmp_path_factory, place, command, odd):
    root = tmp_path_factory.mktemp("enc")
    os.environ["LAUNCH_CACHE_DIR"] = str(root / "cache")
    try:
        model, config = make_model(root, place, odd)  # (a path or file name holds the byte \xe9 itself)
        code, out, err = run([command[0], str(model), "--factor", "2", *command[1:]])
    finally:
        os.environ.pop("LAUNCH_CACHE_DIR", None)
    assert code == 0, err  # (run reads both streams back as strict UTF-8)
    assert "Traceback" not in err and all(line.isprintable() for line in err.splitlines()), err
    if "--json" in command:
        data = json.loads(out)
        if command[0] == "plan" and place == "rope key":  # the escape reads back as the config's own key
            assert data["rope_scaling"][f"k{odd}"] == 1, data["rope_scaling"]
    if command == ("patch",):
        overlay = Path(out.splitlines()[-1])
        written = json.loads((overlay / "config.json").read_bytes().decode("utf-8"))  # valid UTF-8 JSON
        assert {k: v for k, v in written.items() if k != "rope_scaling"} == \
            {k: v for k, v in config.items() if k != "rope_scaling"}
        if place == "rope key":
            assert written["rope_scaling"][f"k{odd}"] == 1


def test_a_real_launch_with_pythons_own_streams_writes_utf8_json_for_a_path_that_is_not(tmp_path):
    """Python writes a lone surrogate to a C.UTF-8 stdout as a raw byte (``surrogateescape``), which
    makes the JSON unreadable as UTF-8; launch's edge writes its escape instead."""
    model, _ = make_model(tmp_path, "model path", "\udce9")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LAUNCH_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "launcher", "plan", os.fsencode(model), "--factor", "2",
                             "--gpu-memory", "80", "--json"], capture_output=True, env=env, cwd=str(REPO), timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.decode("utf-8"))
    assert data["engine"]["model_name"] == os.fsdecode(model.name.encode("utf-8", "surrogateescape"))
    assert result.stderr.decode("utf-8").strip() == ""


# --- every error and warning line is one printable line ------------------------------------------

HOSTILE_TEXT = st.sampled_from(["boom\x1b[31mRED\nSECOND LINE", "a\rb", "\x9b2J", "tab\there", "nul\x00", "\udce9",
                                "\u2028para", "bell\x07", "del\x7f"])


def facts_for(cls: type[LaunchError], text: str) -> dict:
    """A value for each fact of ``cls``: ``text`` in every text fact (and in each item of a tuple)."""
    values = {}
    for name in cls._fields:
        kind = next((inspect.get_annotations(k).get(name) for k in cls.__mro__
                     if name in inspect.get_annotations(k)), "str")
        kind = str(kind)
        if "tuple" in kind or "list" in kind:
            values[name] = (text, text)
        elif kind.startswith("int"):
            values[name] = 3
        elif kind.startswith("float"):
            values[name] = 1.5
        elif kind.startswith("bool"):
            values[name] = True
        else:
            values[name] = text
    return values


ERRORS = sorted(_all_errors(), key=lambda k: k.__name__)


@settings(max_examples=300, deadline=None, database=None)
@given(cls=st.sampled_from(ERRORS), text=HOSTILE_TEXT)
def test_no_fact_of_any_error_adds_a_line_or_a_control_character(cls, text):
    """Every error class (those of other modules too): its message has the lines of its own
    template, whatever a server, file or file name put in its facts."""
    plain = str(cls(**facts_for(cls, "plain")))
    shown = str(cls(**facts_for(cls, text)))
    assert shown.count("\n") == plain.count("\n"), shown
    assert all(line.isprintable() for line in shown.split("\n")), shown


class _HostileNode(JSONHandler):
    """A node whose /health is fine and whose /v1/models fails with a hostile message; it also
    answers the proxy's node list, so `launch proxy add` gets as far as asking the node."""

    def do_GET(self) -> None:
        if self.path in ("/nodes/status", "/health"):
            self.send_json(200, {})
        else:
            self.send_json(500, {"detail": "boom\x1b[31mRED\nSECOND LINE"})


def test_a_servers_escape_codes_and_newlines_stay_escaped_in_the_one_error_line(launch):
    with serving(_HostileNode) as server:
        result = launch("proxy", "add", url_of(server), "--proxy", url_of(server))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("launch: error: "), result.stderr
    assert "\x1b" not in result.stderr and "boom\\x1b[31mRED\\nSECOND LINE" in result.stderr


def test_a_note_naming_a_hostile_directory_stays_one_printable_line(launch, tmp_path):
    presets = tmp_path / "pre\x1bsets\x07\nnext"  # (click itself strips whole ANSI sequences off a pipe)
    presets.mkdir()
    result = launch("presets", env={"LAUNCH_PRESETS_DIR": str(presets)})
    assert result.returncode == 0
    shown = f"{tmp_path}/pre\\x1bsets\\x07\\nnext"
    assert result.stderr == f"\nnote: your own presets go in {shown} (LAUNCH_PRESETS_DIR).\n", result.stderr
    assert tree_state(tmp_path) == {presets.name: "dir"}
