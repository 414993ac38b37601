"""``paths.read_regular``: the one way launch reads a file a user names. A regular file of at most
``max_bytes`` is read; anything else is refused at once (never waited on), with the reason in words.
Each read runs in a daemon thread joined with a deadline, so one that blocks fails instead of hanging."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from launcher.model import hubenv
from launcher.runtime.apikeys import ApiKeyFileError, keys_from_file
from launcher.runtime.paths import UnreadableFile, read_regular

DEADLINE_S = 10


def within_deadline(call):
    """``call()``'s result or exception, or a failure when it has not returned within DEADLINE_S."""
    outcome: list = []

    def run():
        try:
            outcome.append(("value", call()))
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome.append(("error", err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert outcome, f"still blocked after {DEADLINE_S} s"
    return outcome[0]


def make(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "fifo with a writer waiting":
        os.mkfifo(path)
        threading.Thread(target=lambda: open(path, "wb").close(), daemon=True).start()
    elif kind == "link to a fifo":
        os.mkfifo(path.with_name("target"))
        path.symlink_to("target")
    elif kind == "directory":
        path.mkdir()
    elif kind == "/dev/zero":
        return Path("/dev/zero")
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))
        holder.close()
    elif kind == "huge file":
        with open(path, "wb") as handle:
            handle.truncate(8 << 30)
    return path


KINDS = {"fifo": "it is a FIFO, not a regular file", "fifo with a writer waiting": "it is a FIFO, not a regular file",
         "link to a fifo": "it is a FIFO, not a regular file", "directory": "it is a directory, not a regular file",
         "/dev/zero": "it is a device, not a regular file",
         "link to /dev/zero": "it is a device, not a regular file", "socket": "it is a socket, not a regular file",
         "huge file": "it is larger than 1 MiB"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_what_is_no_small_regular_file_is_refused_at_once_saying_what_it_is(tmp_path, kind):
    path = make(tmp_path / "named", kind)
    how, got = within_deadline(lambda: read_regular(path, 1 << 20))
    assert how == "error" and isinstance(got, UnreadableFile) and got.problem == KINDS[kind]


@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 20])
def test_a_regular_file_up_to_the_bound_is_read_whole(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "link").symlink_to("f")
    assert read_regular(tmp_path / "f", 1 << 20) == data == read_regular(tmp_path / "link", 1 << 20)
    (tmp_path / "f").write_bytes(data + b"x")
    with pytest.raises(UnreadableFile, match="larger than"):
        read_regular(tmp_path / "f", size)


def test_a_missing_file_passes_through_and_an_unreadable_one_says_why(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "absent", 10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnreadableFile, match="Not a directory"):
        read_regular(tmp_path / "file" / "below", 10)
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(UnreadableFile, match="symbolic links"):
        read_regular(tmp_path / "loop", 10)


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_api_key_file_goes_through_it(tmp_path, kind):
    path = make(tmp_path / "keys", kind)
    how, got = within_deadline(lambda: keys_from_file(path))
    assert how == "error" and isinstance(got, ApiKeyFileError) and got.exit_code == 2
    assert str(got) == f"cannot read API keys from {path}: {KINDS[kind]}. Give a file with one key per line."


@pytest.mark.parametrize(("named", "kind"), [(True, kind) for kind in KINDS] +
                         [(False, kind) for kind in KINDS if kind != "/dev/zero"])
def test_the_token_file_goes_through_it(tmp_path, monkeypatch, named, kind):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir()
    path = make(tmp_path / "elsewhere" if named else tmp_path / "hf" / "token", kind)
    if named:
        monkeypatch.setenv("HF_TOKEN_PATH", str(path))
    how, got = within_deadline(hubenv.read)
    assert how == "error" and isinstance(got, hubenv.BadHubSetting) and got.exit_code == 2
    assert got.variable == ("HF_TOKEN_PATH" if named else "the token file") and repr(str(path)) in str(got)
    assert KINDS[kind].removesuffix(" 1 MiB") in str(got) and "\n" not in str(got)
