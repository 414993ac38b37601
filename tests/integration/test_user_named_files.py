"""Files a user names for launch to read (issue 17, F2.1): an API key file (``serve --api-key-file``,
``proxy start --api-key-file``) and the Hugging Face token file (``HF_TOKEN_PATH``, else
``$HF_HOME/token``). Each must be a regular file of bounded size; a FIFO, a directory, a device, a
socket or a huge file is one ``launch: error:`` line and exit 2 at once, never a wait, and nothing is
written. Every run is the real CLI in its own process, under a deadline (a read that blocks fails the
test instead of hanging the run).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, free_port

pytestmark = pytest.mark.slow  # the real CLI in a subprocess, a fake hub

DEADLINE_S = 30
KINDS = ["fifo", "link to a fifo", "directory", "/dev/zero", "link to /dev/zero", "socket", "huge file"]
EXPECTED = {"fifo": "it is a FIFO, not a regular file", "link to a fifo": "it is a FIFO, not a regular file",
            "directory": "it is a directory", "/dev/zero": "it is a device, not a regular file",
            "link to /dev/zero": "it is a device, not a regular file",
            "socket": "it is a socket, not a regular file", "huge file": "it is larger than"}


def special(path: Path, kind: str) -> Path:
    """``path`` made a thing of ``kind``; ``/dev/zero`` is that device itself (endless, like a FIFO with a
    writer), wherever ``path`` was."""
    if kind == "/dev/zero":
        return Path("/dev/zero")
    if kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to a fifo":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.name + ".fifo")
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))
        holder.close()
    else:  # 4 GiB, sparse: reading it whole is what must not happen
        with open(path, "wb") as handle:
            handle.truncate(4 << 30)
    return path


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` as lstat sees it (nothing opened: a FIFO or socket would block or
    fail, a huge file take long), with the content of small regular files."""
    state = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            full = Path(dirpath) / name
            st = os.lstat(full)
            small = stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20
            state[str(full)] = (st.st_mode, st.st_size, st.st_mtime_ns, full.read_bytes() if small else None)
    return state


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "launcher", *argv], env=full, capture_output=True, text=True,
                          timeout=DEADLINE_S, check=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["serve --dry-run", "proxy start"])
def test_an_api_key_file_that_is_no_regular_file_is_one_line_at_once(tmp_path, isolated_env, command, kind):
    named = special(tmp_path / "keys", kind)
    cache = tmp_path / "launch-cache"
    argv = (["serve", "internlm2_5-7b-chat", "--dry-run", "--gpu-memory", "80"] if command == "serve --dry-run"
            else ["proxy", "start", "--port", str(free_port()), "--router", "lmdeploy"])
    before = tree_state(tmp_path)
    done = run([*argv, "--api-key-file", str(named)], {"LAUNCH_CACHE_DIR": str(cache)})
    assert_one_line_error(done, f"cannot read API keys from {named}", EXPECTED[kind], code=2)
    assert tree_state(tmp_path) == before and not cache.exists()


@pytest.mark.parametrize(("how", "kind"), [("HF_TOKEN_PATH", kind) for kind in KINDS] +
                         [("HF_HOME/token", kind) for kind in KINDS if kind != "/dev/zero"])
def test_a_token_file_that_is_no_regular_file_is_one_line_before_any_request(tmp_path, isolated_env, hub, how,
                                                                               kind):
    env = {"LAUNCH_HUB_TIMEOUT": "5"}
    if how == "HF_TOKEN_PATH":
        env["HF_TOKEN_PATH"] = str(special(tmp_path / "token", kind))
        needle = f"HF_TOKEN_PATH '{env['HF_TOKEN_PATH']}'"
    else:
        (tmp_path / "hf").mkdir()
        special(tmp_path / "hf" / "token", kind)
        env["HF_HOME"] = str(tmp_path / "hf")
        needle = f"the token file '{tmp_path / 'hf' / 'token'}'"
    before = tree_state(tmp_path)
    for argv in (["fetch", "org/tiny"], ["plan", "org/tiny", "--factor", "2"]):
        done = run(argv, env)
        assert_one_line_error(done, needle, EXPECTED[kind], code=2)
    assert hub.count() == 0 and tree_state(tmp_path) == before


def test_a_small_regular_key_file_and_token_file_are_still_read(tmp_path, isolated_env, hub):
    """The refusals above are about the kind of file, not about reading files at all."""
    keys = tmp_path / "keys"
    keys.write_text("# mine\nk-one\n\nk-two\n")
    done = run(["serve", "internlm2_5-7b-chat", "--dry-run", "--gpu-memory", "80", "--api-key-file", str(keys)],
               {"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert done.returncode == 0, done.stderr
    token = tmp_path / "token"
    token.write_text("hf_" + "a" * 34 + "\n")
    done = run(["fetch", "org/tiny", "-q"], {"HF_TOKEN_PATH": str(token)})
    assert done.returncode == 0, done.stderr
    assert hub.requests()[0].authorization == "Bearer hf_" + "a" * 34, hub.requests()[0]


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("/dev/zero", "huge file")])
@pytest.mark.parametrize("where", ["--out's launch-patch.json", "the model's config.json"])
def test_files_launch_reads_in_an_out_or_a_model_directory_are_never_waited_on(tmp_path, isolated_env, kind, where):
    """A FIFO (or a socket, a device, a directory) where launch reads its own provenance in --out, or a
    model's config.json, is refused or taken as not launch's, at once: `patch` never hangs on it."""
    model = tmp_path / "model"
    model.mkdir()
    config = '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096, ' \
             '"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}'
    out = tmp_path / "out"
    if where == "the model's config.json":
        special(model / "config.json", kind)
    else:
        (model / "config.json").write_text(config)
        out.mkdir()
        special(out / "launch-patch.json", kind)
    before = tree_state(tmp_path)
    done = run(["patch", str(model), "--factor", "2", "--out", str(out)], {"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    needle = "is not a launch overlay" if where.startswith("--out") else str(model)
    assert_one_line_error(done, needle)
    assert tree_state(tmp_path) == before
