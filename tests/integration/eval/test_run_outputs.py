"""``launch probe`` and ``launch ppl`` against a hostile user and a hostile server (issue 17).

- Where results go: only into a directory launch makes or finds empty, never through a link, never
  replacing anything; an ``--out`` that holds anything is refused before the run with one line.
- What ``--compare`` and ``--text`` read: a regular file; a FIFO, device or socket is one error, never
  a hang.
- When a run stops: an engine that takes requests and answers none stops the run after
  ``STUCK_AFTER`` deadline misses in a row, instead of waiting out every remaining request.
- How it exits: 3 when no trial or window was answered; a reply holding NaN, Infinity or a value of
  the wrong type is a bad reply, not an answer.
- What it prints: whatever the server sends, every line printable.

The servers are real HTTP stand-ins on 127.0.0.1 (``tests/support/probe_standin.py``); the CLI runs in-process
(``launcher.cli.main``) except where a hang would hang the test run (then a subprocess with a timeout).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.eval.deadlines import STUCK_AFTER
from launcher.net.lmdeploy import Client, ServerBadReply
from tests.conftest import run_launch
from tests.integration.test_hostile_inputs import cli
from tests.support.probe_standin import ProbeStandin

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
CHARTS = {"probe": "heatmap.png", "ppl": "ppl.png"}
COMPARE_CHARTS = {"probe": "heatmap-compare.png", "ppl": "ppl-compare.png"}


@pytest.fixture(autouse=True)
def no_key_env(monkeypatch):
    monkeypatch.delenv("LAUNCH_API_KEY", raising=False)


def run_args(command: str, url: str, *extra: str) -> list[str]:
    """A short run of ``command``: one probe prompt, or two ppl windows."""
    if command == "probe":
        return ["probe", "--url", url, "--lengths", "300", "--depths", "0", "--trials", "1", "--timeout", "5", *extra]
    return ["ppl", "--url", url, "--lengths", "300,600", "--span", "100", "--timeout", "5", *extra]


def tree(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` as lstat sees it (links not followed, FIFOs never opened)."""
    state = {}
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            for name in dirs + names:
                full = os.path.join(dirpath, name)
                info = os.lstat(full)
                if stat.S_ISLNK(info.st_mode):
                    state[full] = ("link", os.readlink(full))
                elif stat.S_ISREG(info.st_mode):
                    state[full] = ("file", hashlib.sha256(Path(full).read_bytes()).hexdigest(), info.st_mode)
                else:
                    state[full] = ("other", info.st_mode, info.st_ino)
    return state


def all_printable(*texts: str) -> bool:
    return all(line.isprintable() for text in texts for line in text.splitlines())


# --- where the results go ----------------------------------------------------------------------

OUR_NAMES = ("results.json", "heatmap.png", "ppl.png", "heatmap-compare.png", "ppl-compare.png",
             "results.json.tmp", ".results.json.tmp", "notes.txt", ".hidden")
ENTRY_KINDS = ("file", "dir", "link-to-outside-file", "dangling-link-outside", "link-to-inside", "fifo")
OUT_KINDS = ("absent", "empty-dir", "dir-holding", "file", "link-to-empty-dir", "dangling-link", "fifo",
             "under-a-file", "in-the-hf-cache", "new-under-new-parents")


def make_entry(path: Path, kind: str, outside: Path) -> None:
    if kind == "file":
        path.write_bytes(b"the user's own " + path.name.encode())
    elif kind == "dir":
        path.mkdir()
        (path / "inside").write_text("mine")
    elif kind == "link-to-outside-file":
        path.symlink_to(outside)
    elif kind == "dangling-link-outside":
        path.symlink_to(outside.parent / f"would-be-created-{path.name}")
    elif kind == "link-to-inside":
        path.symlink_to("notes-target")
    else:
        os.mkfifo(path)


def make_out(root: Path, hf_cache: Path, kind: str, entries: list[tuple[str, str]]) -> Path:
    """An --out of ``kind`` under ``root`` (``entries`` in it for "dir-holding")."""
    out = root / "out"
    outside = root / "victim.txt"
    outside.write_text("a file outside --out")
    if kind == "empty-dir":
        out.mkdir(mode=0o700)
        os.chmod(out, 0o700)
    elif kind == "dir-holding":
        out.mkdir()
        for name, entry in entries:
            make_entry(out / name, entry, outside)
    elif kind == "file":
        out.write_text("a file of the user's")
    elif kind == "link-to-empty-dir":
        (root / "real").mkdir()
        out.symlink_to(root / "real")
    elif kind == "dangling-link":
        out.symlink_to(root / "nowhere")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "under-a-file":
        (root / "plain").write_text("x")
        out = root / "plain" / "out"
    elif kind == "in-the-hf-cache":
        snapshot = hf_cache / "models--org--name" / "snapshots" / uuid.uuid4().hex
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        out = snapshot / "run"
    elif kind == "new-under-new-parents":
        out = root / "a" / "b" / "out"
    return out


@pytest.fixture(scope="module")
def earlier_runs(tmp_path_factory):
    """One real probe run and one real ppl run, for --compare."""
    base = tmp_path_factory.mktemp("earlier")
    with ProbeStandin(visible=5000, session_len=100_000) as server:
        for command in ("probe", "ppl"):
            proc = run_launch(*run_args(command, server.url, "--out", str(base / command)),
                              env={"LAUNCH_API_KEY": ""})
            assert proc.returncode == 0, proc.stderr
    return base


@pytest.mark.parametrize("command", ["probe", "ppl", "probe --compare", "ppl --compare"])
def test_results_go_only_into_a_new_or_empty_directory_and_nothing_else_changes(
        capsys, monkeypatch, tmp_path, earlier_runs, command):
    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    name, _, compare = command.partition(" ")
    made = COMPARE_CHARTS[name] if compare else CHARTS[name]
    entries = st.lists(st.tuples(st.sampled_from(OUR_NAMES), st.sampled_from(ENTRY_KINDS)), min_size=1,
                       max_size=4, unique_by=lambda e: e[0])

    with ProbeStandin(visible=5000, session_len=100_000) as server:

        @PROPERTY
        @given(kind=st.sampled_from(OUT_KINDS), inside=entries)
        def check(kind, inside):
            root = Path(tempfile.mkdtemp(dir=tmp_path))
            out = make_out(root, hf_cache, kind, inside)
            before = tree(root, hf_cache)
            inode = os.lstat(out).st_ino if kind == "empty-dir" else None
            prompts = len(server.prompts) + len(server.ppl_inputs)
            argv = ([name, "--compare", str(earlier_runs / name), str(earlier_runs / name)] if compare
                    else run_args(name, server.url))
            code, stdout, err = cli(capsys, *argv, "--out", str(out))
            after = tree(root, hf_cache)
            if kind in ("absent", "empty-dir", "new-under-new-parents"):
                assert code == 0, err
                new = {p for p in after if p not in before}
                expected = {str(out / made)} if compare else {str(out / "results.json"), str(out / made)}
                assert new - {str(p) for p in out.parents} == expected | ({str(out)} if kind != "empty-dir" else set())
                assert all(after[p][0] == "file" for p in expected)  # real files, no link, no temporary left
                assert {p: v for p, v in after.items() if p in before and p != str(out)} == \
                    {p: v for p, v in before.items() if p != str(out)}
                if inode is not None:  # the user's own empty directory, kept as it was (mode 0700)
                    assert os.lstat(out).st_ino == inode and stat.S_IMODE(os.lstat(out).st_mode) == 0o700
                assert f"wrote {out / ('results.json' if not compare else made)}" in stdout
            else:
                assert code == 2, (kind, inside, err)
                assert stdout == "" and err.count("\n") == 1 and err.startswith("launch: error: --out "), err
                assert after == before  # nothing written, changed or created, here or through a link
                assert len(server.prompts) + len(server.ppl_inputs) == prompts  # refused before the run

        check()


def test_results_that_cannot_be_written_are_one_line_and_leave_no_directory(tmp_path):
    """A file system that takes no more (here: a file size limit of 1 kB, EFBIG like a full disk's
    ENOSPC): the table still printed, one error line, exit 1, and the directory launch made for the
    run is gone again."""
    import resource
    import subprocess
    import sys

    from tests.conftest import REPO

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    with ProbeStandin(visible=5000, session_len=100_000) as server:
        proc = subprocess.run([sys.executable, "-m", "launcher", *run_args("probe", server.url),
                               "--out", str(tmp_path / "o")], check=False, cwd=REPO, capture_output=True,
                              text=True, timeout=120, preexec_fn=small_files, env={**os.environ, "LAUNCH_API_KEY": ""})
    assert proc.returncode == 1
    assert "overall accuracy 1.00 (1/1 found" in proc.stdout and "wrote" not in proc.stdout  # the numbers survive
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"launch: error: cannot write the results at {tmp_path / 'o' / 'results.json'}: ")
    assert "nothing of yours was changed" in last and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


CHANGES = ("user-file", "user-results-link", "user-chart-link-outside", "out-became-a-link", "out-became-a-file",
           "out-removed", "another-run-wrote-there", "fifo-named-like-a-chart")


@PROPERTY
@given(change=st.sampled_from(CHANGES), command=st.sampled_from(["probe", "ppl"]))
def test_an_out_taken_during_the_run_keeps_its_contents_and_the_results_go_beside_it(change, command):
    """``--out`` is checked before the run and written hours later: whatever appeared there meanwhile
    stays untouched, and the results still land, in a new directory launch makes beside it."""
    from launcher.eval.ppl import write_outputs as write_ppl
    from launcher.eval.probe import write_outputs as write_probe
    from launcher.eval.runfiles import check_out_dir

    result = _results()[command]
    write = write_probe if command == "probe" else write_ppl
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        out = check_out_dir(root / "out", example="./run")
        (root / "victim").write_text("outside")
        out.mkdir()
        if change == "user-file":
            (out / "notes.txt").write_text("mine")
        elif change == "user-results-link":
            (out / "results.json").symlink_to(root / "victim")
        elif change == "user-chart-link-outside":
            (out / CHARTS[command]).symlink_to(root / "created-outside.png")
        elif change == "out-became-a-link":
            out.rmdir()
            (root / "elsewhere").mkdir()
            out.symlink_to(root / "elsewhere")
        elif change == "out-became-a-file":
            out.rmdir()
            out.write_text("mine")
        elif change == "out-removed":
            out.rmdir()
        elif change == "another-run-wrote-there":
            write(result, out)
        else:
            os.mkfifo(out / CHARTS[command])
        before = tree(root)
        paths = write(result, out)
        after = tree(root)
        assert {p: v for p, v in after.items() if p in before} == before  # nothing of the user's touched
        if change == "out-removed":
            assert paths.out_dir == out and paths.note is None
        else:
            assert paths.out_dir == root / "out-2" and "out-2" in paths.note and str(out) in paths.note
        assert json.loads(paths.results_json.read_bytes())["settings"]["lengths"] == list(result.settings.lengths)
        written = {p for p in after if p not in before}
        assert written == {str(paths.out_dir), str(paths.results_json), str(paths.out_dir / CHARTS[command])}
        assert not (root / "created-outside.png").exists()


_CACHE: dict = {}


def _results() -> dict:
    """A real probe result and a real ppl result from the stand-in (made once)."""
    if not _CACHE:
        from launcher.eval.ppl import PplSettings, run_ppl
        from launcher.eval.probe import ProbeSettings, run_probe

        with ProbeStandin(visible=5000, session_len=100_000) as server:
            _CACHE["probe"] = run_probe(ProbeSettings(url=server.url, lengths=(300,), depths=(0.0,), trials=1))
            _CACHE["ppl"] = run_ppl(PplSettings(url=server.url, lengths=(300, 600), span=100))
    return _CACHE


# What a command line can carry: every character but NUL (argv strings end at it).
ARGV_TEXT = st.text(st.characters(blacklist_characters="\x00"), max_size=5)


@PROPERTY
@given(command=st.sampled_from(["probe", "ppl"]), head=ARGV_TEXT, tail=ARGV_TEXT,
       control=st.characters(categories=["Cc"], blacklist_characters="\x00"))
def test_an_out_name_with_a_control_character_is_refused_and_nothing_made(command, head, tail, control):
    import io
    from contextlib import redirect_stderr

    from launcher.cli import main

    with tempfile.TemporaryDirectory() as name:
        out = Path(name) / f"run{head}{control}{tail}"
        err = io.StringIO()
        with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            main(run_args(command, "http://127.0.0.1:9", "--out", str(out)))
        assert exit_.value.code == 2 and os.listdir(name) == []
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "control character" in lines[0] and all_printable(*lines)


# --- what --compare and --text read -------------------------------------------------------------


def special_file(root: Path, kind: str) -> Path:
    if kind == "device":
        return Path("/dev/zero")
    path = root / "special"
    if kind == "socket":
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))  # closed with the process; the file stays
        holder.close()
    else:
        os.mkfifo(path)
    if kind == "fifo-as-results.json":
        (root / "run").mkdir()
        path.rename(root / "run" / "results.json")
        return root / "run"
    if kind == "link-to-fifo":
        (root / "link").symlink_to(path)
        return root / "link"
    return path


@pytest.mark.parametrize("kind", ["fifo", "fifo-as-results.json", "link-to-fifo", "device", "socket"])
@pytest.mark.parametrize("command", ["probe", "ppl"])
def test_compare_refuses_what_is_not_a_regular_file_without_waiting_on_it(tmp_path, command, kind):
    target = special_file(tmp_path, kind)
    # A subprocess with a deadline: a read that blocks must fail this test, not hang the run.
    proc = run_launch(command, "--compare", str(target), str(target), "--out", str(tmp_path / "c"), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "not a regular file" in proc.stderr, proc.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_a_ppl_text_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path, kind):
    import threading

    from launcher.eval.ppl.text import PplBadText, load_texts

    target = special_file(tmp_path, kind)
    outcome = []

    def read():
        try:
            load_texts((target,))
        except PplBadText as err:
            outcome.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert outcome and "not a regular file" in outcome[0]


@pytest.mark.parametrize("command", ["probe", "ppl"])
def test_a_tokenizer_directory_holding_a_fifo_is_refused_without_waiting(tmp_path, command):
    (tmp_path / "tok").mkdir()
    os.mkfifo(tmp_path / "tok" / "tokenizer.json")
    with ProbeStandin(visible=5000, encode=False) as server:  # no /v1/encode: the local tokenizer counts
        proc = run_launch(*run_args(command, server.url, "--tokenizer", str(tmp_path / "tok"), "--out",
                                    str(tmp_path / "o")), env={"LAUNCH_API_KEY": ""}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"cannot load a tokenizer from {tmp_path / 'tok'}: tokenizer.json is not a regular file" in proc.stderr
    assert not (tmp_path / "o").exists()


# --- a stuck engine, and runs that answered nothing ---------------------------------------------


def test_probe_stops_when_the_engine_stops_answering(tmp_path, capsys):
    with ProbeStandin(visible=5000, session_len=100_000, hang_after=0) as server:
        code, stdout, err = cli(capsys, "probe", "--url", server.url, "--lengths", "300,400", "--depths", "0,0.5,1",
                                "--trials", "3", "--timeout", "1", "--out", str(tmp_path / "o"))
        sent = len(server.prompts)
    assert code == 3 and sent == STUCK_AFTER  # not the 18 planned: it stopped after 3 misses in a row
    last = err.splitlines()[-1]
    assert last.startswith(f"launch: error: {server.url} left 3 requests in a row unanswered within the 1 s")
    assert "engine looks stuck" in last
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(data["trials"]) == STUCK_AFTER and "engine looks stuck" in data["stopped_by"]
    assert all("did not answer within 1 s" in t["error"] for t in data["trials"])
    assert f"stopped early: {server.url} left 3 requests" in stdout


def test_ppl_stops_when_the_engine_stops_answering(tmp_path, capsys):
    # /get_ppl answers the first (2-token) check, then nothing.
    with ProbeStandin(visible=5000, session_len=100_000, hang=lambda kind, n: kind == "ppl" and n > 1) as server:
        code, _, err = cli(capsys, "ppl", "--url", server.url, "--lengths", "300,400,500,600,700,800",
                           "--span", "100", "--timeout", "1", "--out", str(tmp_path / "o"))
        calls = server.ppl_calls
    assert code == 3 and calls == 1 + STUCK_AFTER
    assert "engine looks stuck" in err.splitlines()[-1]
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())["points"]) == STUCK_AFTER


def test_misses_that_are_not_in_a_row_do_not_stop_the_sweep(tmp_path, capsys):
    # Every third prompt hangs: two misses are never adjacent, so all 9 trials run.
    with ProbeStandin(visible=5000, session_len=100_000, hang=lambda kind, n: n % 3 == 0) as server:
        code, _, err = cli(capsys, "probe", "--url", server.url, "--lengths", "300", "--depths", "0,0.5,1",
                           "--trials", "3", "--timeout", "0.5", "--out", str(tmp_path / "o"))
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert code == 0, err
    assert len(data["trials"]) == 9 and sum(t["error"] is not None for t in data["trials"]) == 3


def json_values():
    """Any JSON value, NaN and the infinities included (Python's json writes and reads them)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def finite_all_through(value) -> bool:
    """No NaN or infinity anywhere in ``value``, however deep."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(finite_all_through(v) for v in value)
    if isinstance(value, dict):
        return all(finite_all_through(v) for v in value.values())
    return True


def failed_reply():
    """A reply that answers nothing: an error status, an error body, not JSON, the wrong shape, or a
    message whose content is not text (NaN, a number, a list...)."""
    bodies = st.sampled_from([b'{"detail": "boom"}', b"<html>bad gateway</html>", b"", b'{"choices": []}',
                              b'{"error_code": 10402, "text": "Failed to get response"}',
                              b'{"object": "error", "message": "no", "code": 400}', b'{"ppl": NaN}'])
    # No answer text: null (or absent), blank, or not text at all.
    no_text = json_values().filter(lambda v: not isinstance(v, str) or not v.strip())
    content = no_text.map(lambda v: json.dumps(  # [v]: a list is never the number 'ppl' must be
        {"choices": [{"message": {"role": "assistant", "content": v}}], "ppl": [v]}).encode())
    return st.tuples(st.sampled_from([200, 400, 413, 500, 502, 503]), bodies) | st.tuples(st.just(200), content)


@pytest.mark.parametrize("command", ["probe", "ppl"])
def test_a_run_that_nothing_answered_exits_3_and_keeps_its_results(tmp_path, capsys, command):
    path = "/v1/chat/completions" if command == "probe" else "/get_ppl"
    with ProbeStandin(visible=5000, session_len=100_000) as server:

        @PROPERTY
        @given(reply=failed_reply())
        def check(reply):
            # ppl: the first /get_ppl (the 2-token check before the run) fails the same way as the windows.
            server.raw[path] = reply
            server.raw_counts.clear()
            out = Path(tempfile.mkdtemp(dir=tmp_path)) / "o"
            code, stdout, err = cli(capsys, *run_args(command, server.url, "--out", str(out)))
            what = "trial" if command == "probe" else "window"
            total = 1 if command == "probe" else 2
            assert code == 3, err
            assert err.splitlines()[-1].startswith(f"launch: error: no {what} was answered: all {total} failed, e.g. ")
            data = json.loads((out / "results.json").read_text())
            items = data["trials"] if command == "probe" else data["points"]
            assert len(items) == total and all(item["error"] for item in items)
            assert all_printable(stdout, err)

        check()


def test_every_length_past_the_session_exits_3(tmp_path, capsys):
    with ProbeStandin(visible=5000, session_len=200) as server:
        code, _, err = cli(capsys, "probe", "--url", server.url, "--lengths", "300,400", "--depths", "0,1",
                           "--trials", "1", "--out", str(tmp_path / "o"))
    assert code == 3 and "no trial was answered: all 4 failed, e.g. HTTP 400: Input length" in err


def chat_body(message: dict) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "model": "standin-7b-chat",
                       "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 300, "completion_tokens": 1}}).encode()


BLANK = st.text(alphabet=" \t\n\r\u00a0\u2003\u3000", max_size=4)  # text with nothing in it


@pytest.mark.parametrize("wrong_answer", [False, True])
def test_a_reply_with_no_answer_text_is_no_answer_and_a_wrong_one_is_an_answer(tmp_path, capsys, wrong_answer):
    """``content`` null, absent, empty or blank (and ``reasoning_content`` no better) holds no answer: a
    run of such replies exits 3 like every other run that nothing answered. A reply with any text is
    an answer, right or wrong (exit 0, accuracy 0)."""
    with ProbeStandin(visible=5000, session_len=100_000) as server:

        @PROPERTY
        @given(content=st.none() | BLANK, reasoning=st.none() | BLANK, absent=st.sampled_from(["", "content",
               "reasoning_content", "both"]), text=st.text(min_size=1, max_size=12).filter(lambda t: t.strip() and not any(c.isdigit() for c in t)))
        def check(content, reasoning, absent, text):
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            for name in {"both": ("content", "reasoning_content")}.get(absent, (absent,)):
                message.pop(name, None)
            if wrong_answer:  # the same shape with some text in it, where the model puts its answer
                message["content" if absent not in ("content", "both") else "reasoning_content"] = f"x{text}"
            server.raw["/v1/chat/completions"] = (200, chat_body(message))
            out = Path(tempfile.mkdtemp(dir=tmp_path)) / "o"
            code, stdout, err = cli(capsys, "probe", "--url", server.url, "--lengths", "300", "--depths", "0,1",
                                    "--trials", "2", "--timeout", "5", "--out", str(out))
            data = json.loads((out / "results.json").read_text())
            assert len(data["trials"]) == 4 and data["overall_accuracy"] == 0
            assert (out / "heatmap.png").stat().st_size > 0
            if wrong_answer:
                assert code == 0, err
                assert all(t["error"] is None and t["answer"] == f"x{text}" for t in data["trials"])
            else:
                assert code == 3, err
                assert err.splitlines()[-1].startswith("launch: error: no trial was answered: all 4 failed, e.g. ")
                assert "no answer text" in err.splitlines()[-1]
                assert all(t["error"] and t["answer"] is None for t in data["trials"])
                assert "ERR" in stdout
            assert all_printable(stdout, err)

        check()


def not_a_loss():
    """A /get_ppl reply that is no loss: an error status, an error body, not JSON, or JSON whose
    'ppl' is not a finite number >= 0 (absent, null, NaN, Infinity, a string, a list, negative...)."""
    def is_loss(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    statuses = st.sampled_from([400, 413, 422, 429, 500, 502, 503])  # 404 / 405: no /get_ppl
    bodies = st.sampled_from([b'{"detail": "boom"}', b"<html>bad gateway</html>", b"", b"{", b"{}", b"[]",
                              b'"ok"', b"null", b'{"ppl": NaN}', b'{"ppl": Infinity}', b'{"ppl": -Infinity}',
                              b'{"ppl": 1e999}', b'{"ppl": "2.5"}', b'{"ppl": null}', b'{"ppl": -1}',
                              b'{"error_code": 10402, "text": "Failed to get response"}',
                              b'{"object": "error", "message": "no", "code": 400}'])
    values = json_values().filter(lambda v: not is_loss(v)).map(lambda v: json.dumps({"ppl": v}).encode())
    whole = json_values().filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
    return st.tuples(statuses, bodies) | st.tuples(st.just(200), bodies | values | whole)


@pytest.mark.parametrize("windows_answer", [False, True])
def test_ppl_goes_on_past_a_first_request_that_is_no_loss(tmp_path, capsys, windows_answer):
    """The first /get_ppl (the short check before the windows) failing as a window can (any status but
    404 / 405, any reply that is no loss) does not end the run: the windows are scored and written, and
    the exit says whether any was (0) or none (3), as probe's does."""
    with ProbeStandin(visible=5000, session_len=100_000) as server:

        @PROPERTY
        @given(reply=not_a_loss())
        def check(reply):
            server.raw["/get_ppl"] = (lambda n: reply if n == 1 else None) if windows_answer else reply
            server.raw_counts.clear()
            out = Path(tempfile.mkdtemp(dir=tmp_path)) / "o"
            code, stdout, err = cli(capsys, *run_args("ppl", server.url, "--out", str(out)))
            data = json.loads((out / "results.json").read_text())
            assert len(data["points"]) == 2 and (out / "ppl.png").stat().st_size > 0
            assert server.raw_counts["/get_ppl"] == 1 + 2 * (1 if not windows_answer else 2)  # check + windows
            if windows_answer:
                assert code == 0, err
                assert all(p["error"] is None and p["span_loss"] == pytest.approx(2.0) for p in data["points"])
            else:
                assert code == 3, err
                assert err.splitlines()[-1].startswith("launch: error: no window was answered: all 2 failed, e.g. ")
                assert all(p["error"] and p["span_loss"] is None for p in data["points"])
            assert "Traceback" not in err and all_printable(stdout, err)

        check()


@pytest.mark.parametrize("hung", ["first", "all"])
def test_ppl_goes_on_past_a_first_request_past_its_deadline(tmp_path, capsys, hung):
    """A first /get_ppl past its deadline is one miss toward the stuck engine, not the end of the run."""
    hang = (lambda kind, n: kind == "ppl" and n == 1) if hung == "first" else (lambda kind, n: kind == "ppl")
    with ProbeStandin(visible=5000, session_len=100_000, hang=hang) as server:
        code, _, err = cli(capsys, "ppl", "--url", server.url, "--lengths", "300,600", "--span", "100",
                                "--timeout", "1", "--out", str(tmp_path / "o"))
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(data["points"]) == 2 and (tmp_path / "o" / "ppl.png").exists()
    if hung == "first":
        assert code == 0, err
        assert all(p["error"] is None for p in data["points"])
    else:  # the check and both windows: 3 misses in a row, the engine is stuck
        assert code == 3, err
        assert "engine looks stuck" in err.splitlines()[-1] and "engine looks stuck" in data["stopped_by"]
        assert all("did not answer within 1 s" in p["error"] for p in data["points"])


def test_ppl_without_get_ppl_still_stops_before_the_windows_writing_nothing(tmp_path, capsys):
    for status in (404, 405):
        with ProbeStandin(visible=5000, session_len=100_000,
                          raw={"/get_ppl": (status, b'{"detail": "Not Found"}')}) as server:
            code, stdout, err = cli(capsys, *run_args("ppl", server.url, "--out", str(tmp_path / "o")))
            calls = server.raw_counts["/get_ppl"]
        assert code == 1 and calls == 1 and stdout == ""
        assert err.splitlines()[-1] == (f"launch: error: {server.url} has no POST /get_ppl (HTTP {status}): launch "
                                        "ppl needs lmdeploy's api_server (launch serve), which scores a text there.")
        assert not (tmp_path / "o").exists()


HUGE = (st.floats(min_value=1e15, max_value=1.7976931348623157e308)
        | st.sampled_from([1e308, 1.7976931348623157e308, 1e300, 1e20, 800.0, 710.0]))


def test_a_loss_too_large_to_chart_is_left_off_the_chart_not_a_traceback(tmp_path, capsys):
    """Every /get_ppl answers a finite loss far past anything a chart can place (1e308 crashed
    matplotlib's axis arithmetic): the run writes its results and its chart and exits by what was
    scored, 3 when no span loss is finite, 0 otherwise."""
    with ProbeStandin(visible=5000, session_len=100_000) as server:

        @PROPERTY
        @given(loss=HUGE, which=st.sampled_from(["all", "the longer window"]))
        def check(loss, which):
            # requests: 1 the check, 2-3 the 300-token window and its prefix, 4-5 the 600-token ones
            reply = (200, json.dumps({"ppl": loss}).encode())
            server.raw["/get_ppl"] = reply if which == "all" else (lambda n: reply if n >= 4 else None)
            server.raw_counts.clear()
            out = Path(tempfile.mkdtemp(dir=tmp_path)) / "o"
            code, stdout, err = cli(capsys, *run_args("ppl", server.url, "--out", str(out)))
            assert "Traceback" not in err and all_printable(stdout, err)
            data = json.loads((out / "results.json").read_text())
            assert (out / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            scored = [p for p in data["points"] if p["span_loss"] is not None]
            assert code == (0 if scored else 3), err
            assert len(data["points"]) == 2 and (which == "all" or scored)

        check()


@pytest.mark.parametrize("field", ["span_loss", "window_loss", "length", "native_context"])
def test_ppl_compare_draws_any_run_it_takes_and_refuses_the_rest_in_one_line(tmp_path, capsys, earlier_runs, field):
    """A results.json edited to hold any value in one field: a number the chart cannot place is left
    off it (exit 0, the chart written); a value no `launch ppl` writes is refused (exit 2), never a
    traceback."""
    from launcher.eval.probe.settings import MAX_LENGTH

    original = json.loads((earlier_runs / "ppl" / "results.json").read_text())

    def valid(value) -> bool:
        whole = isinstance(value, int) and not isinstance(value, bool)
        if field == "length":
            return whole and 1 <= value <= MAX_LENGTH
        if field == "native_context":
            return value is None or (whole and 1 <= value <= 2**31 - 1)
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an int past any float
            return False

    @PROPERTY
    @given(value=json_values() | HUGE | st.integers(min_value=-10, max_value=10**400))
    def check(value):
        data = json.loads(json.dumps(original))
        if field == "native_context":
            data["settings"]["native_context"] = value
        else:
            data["lengths"][0][field] = value
        run = Path(tempfile.mkdtemp(dir=tmp_path))
        (run / "results.json").write_text(json.dumps(data))
        out = Path(tempfile.mkdtemp(dir=tmp_path)) / "o"
        code, stdout, err = cli(capsys, "ppl", "--compare", str(earlier_runs / "ppl"), str(run), "--out", str(out))
        assert "Traceback" not in err and all_printable(stdout, err)
        if valid(value):
            assert code == 0, err
            assert (out / "ppl-compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert code == 2 and stdout == "" and err.count("\n") == 1, err
            assert err.startswith(f"launch: error: --compare {run}") and not out.exists()

    check()


@pytest.mark.parametrize("field", ["correct", "error", "http_status", "answer", "latency_s", "prompt_tokens"])
def test_probe_compare_draws_only_trials_of_launchs_shape(tmp_path, capsys, earlier_runs, field):
    """A trial edited to hold any value in one field: a value of the type `launch probe` writes is
    drawn (exit 0), any other refused in one line (exit 2): a `correct` of 2, NaN or "yes" never
    becomes an accuracy past 1, nan or a traceback."""
    original = json.loads((earlier_runs / "probe" / "results.json").read_text())
    kinds = {"correct": (bool,), "error": (str, type(None)), "answer": (str, type(None)),
             "http_status": (int, type(None)), "prompt_tokens": (int, type(None)),
             "latency_s": (int, float, type(None))}

    def valid(value) -> bool:
        if field == "correct":
            return isinstance(value, bool)
        if field == "error" and value == "":  # a failed trial always says why
            return False
        if isinstance(value, bool) or not isinstance(value, kinds[field]):
            return False
        if isinstance(value, float):
            return math.isfinite(value) and value >= 0
        return not isinstance(value, int) or value >= 0

    @PROPERTY
    @given(value=json_values())
    def check(value):
        data = json.loads(json.dumps(original))
        data["trials"][0][field] = value
        run = Path(tempfile.mkdtemp(dir=tmp_path))
        (run / "results.json").write_text(json.dumps(data))
        out = Path(tempfile.mkdtemp(dir=tmp_path)) / "o"
        code, stdout, err = cli(capsys, "probe", "--compare", str(earlier_runs / "probe"), str(run),
                                "--out", str(out))
        assert "Traceback" not in err and all_printable(stdout, err)
        if valid(value):
            assert code == 0, err
            assert (out / "heatmap-compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert all(0 <= float(a) <= 1 for a in re.findall(r"accuracy (\S+) \(", stdout))
        else:
            assert code == 2 and stdout == "" and err.count("\n") == 1, err
            assert err.startswith(f"launch: error: --compare {run}: ") and not out.exists()

    check()


@pytest.mark.parametrize("where", ["id", "content", "reasoning_content", "prompt_tokens"])
def test_reply_values_of_the_wrong_type_are_bad_replies_not_answers(where):
    with ProbeStandin(visible=5000) as server:
        client = Client(server.url, timeout=5)

        @PROPERTY
        @given(value=json_values())
        def check(value):
            body = json.dumps({"data": [{"id": value}]} if where == "id" else {
                "choices": [{"message": {"role": "assistant", **({where: value} if where != "prompt_tokens" else
                                                                {"content": "The pass key is 1."})}}],
                "usage": {"prompt_tokens": value if where == "prompt_tokens" else 5}})
            server.raw["/v1/models" if where == "id" else "/v1/chat/completions"] = (200, body.encode())
            ok_text = isinstance(value, str) and (where != "id" or value.strip())
            if not finite_all_through(value):  # NaN or an infinity anywhere: the reply is not JSON at all
                with pytest.raises(ServerBadReply) as info:
                    client.models() if where == "id" else client.chat("m", "hi", 8)
                assert "which is not a JSON number" in str(info.value)
            elif where == "prompt_tokens":
                reply = client.chat("m", "hi", 8)
                whole = isinstance(value, int) and not isinstance(value, bool) and value >= 0
                assert reply.prompt_tokens == (value if whole else None)
            elif ok_text or (where != "id" and value is None):
                got = client.models() if where == "id" else client.chat("m", "hi", 8).text
                assert got == ([value] if where == "id" else (value or ""))
            else:
                with pytest.raises(ServerBadReply):
                    client.models() if where == "id" else client.chat("m", "hi", 8)

        check()


# --- what the server sends is printed printable ------------------------------------------------

ISSUE_DETAIL = json.dumps({"detail": "boom\x1b[31mRED\nSECOND LINE"}).encode()


@pytest.mark.parametrize(("command", "path"), [("probe", "/v1/models"), ("probe", "/v1/chat/completions"),
                                               ("ppl", "/v1/models"), ("ppl", "/get_ppl")])
def test_a_500_with_escape_codes_in_its_detail_prints_one_printable_line(tmp_path, command, path):
    """The case of issue 16, end to end through the real CLI in a subprocess."""
    raw = {path: (500, ISSUE_DETAIL) if path != "/get_ppl" else (lambda n: (500, ISSUE_DETAIL) if n > 1 else None)}
    with ProbeStandin(visible=5000, session_len=100_000, raw=raw) as server:
        proc = run_launch(*run_args(command, server.url, "--out", str(tmp_path / "o")), env={"LAUNCH_API_KEY": ""})
    assert "\x1b" not in proc.stdout + proc.stderr
    assert all_printable(proc.stdout, proc.stderr)
    last = proc.stderr.splitlines()[-1]
    assert last.endswith("boom\\x1b[31mRED\\nSECOND LINE") or "boom\\x1b[31mRED\\nSECOND LINE (details in" in last
    assert proc.returncode == (1 if path == "/v1/models" else 3)
    assert not any(line.startswith("SECOND LINE") for line in (proc.stdout + proc.stderr).splitlines())


@PROPERTY
@given(text=st.text(min_size=1, max_size=30), where=st.sampled_from(["detail", "error body", "model id"]))
def test_whatever_the_server_sends_every_line_probe_prints_is_printable(text, where):
    import io
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from launcher.cli import main

    raw = {"detail": {"/v1/chat/completions": (500, json.dumps({"detail": text}).encode())},
           "error body": {"/v1/chat/completions": (200, json.dumps({"error_code": 7, "text": text}).encode())},
           "model id": {"/v1/models": (200, json.dumps({"data": [{"id": f"m{text}"}]}).encode())}}[where]
    out, err = io.StringIO(), io.StringIO()
    with ProbeStandin(visible=5000, session_len=100_000, raw=raw, model=f"m{text}") as server, \
            tempfile.TemporaryDirectory() as name, redirect_stdout(out), redirect_stderr(err), \
            warnings.catch_warnings(record=True) as warned, pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("always")
        main(["probe", "--url", server.url, "--lengths", "300", "--depths", "0,1", "--trials", "1",
              "--out", str(Path(name) / "o")])
    assert exit_.value.code == (0 if where == "model id" else 3), err.getvalue()
    assert all_printable(out.getvalue(), err.getvalue())
    assert [str(w.message) for w in warned] == []  # a warning would print its own lines on stderr


@PROPERTY
@given(line=st.text(max_size=40), tty=st.booleans())
def test_the_server_start_progress_line_is_printable(line, tty):
    """``serve`` shows the server's last log line while it loads: whatever the server logged, one
    printable line (the terminal's own rewrite, carriage return and erase, is launch's only escape)."""
    import io

    from launcher.runtime.progress import StartProgress

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stream = Stream()
    progress = StartProgress(stream, log_path=Path("server.log"), every_s=1.0)
    progress.update(2.0, line)
    progress.done(3.0)
    shown = stream.getvalue().replace("\r\x1b[K", "")
    assert all_printable(shown) and shown.count("\n") == (2 if tty else 3)
