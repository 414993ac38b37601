"""``launch probe`` as a user runs it: a real subprocess against the stand-in server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher.eval.probe.chart import HEATMAP_SIZE_PX
from tests.conftest import REPO, assert_one_line_error, run_launch
from tests.support.probe_standin import ProbeStandin, closed_port_url, png_size

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def rows(stdout: str) -> dict[str, list[str]]:
    """Table rows by depth label: {'0.00': ['1.00', '1.00', '0.00'], ...}."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and len(parts[0]) == 4 and parts[0][1] == "." and parts[0].replace(".", "").isdigit():
            found[parts[0]] = parts[1:]
    return found


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv("LAUNCH_API_KEY", raising=False)


def test_done_when_sweep_reports_and_writes_results_and_chart(tmp_path, no_key_env):
    out = tmp_path / "probe"
    with ProbeStandin(visible=1000) as server:
        proc = run_launch("probe", "--url", server.url, "--lengths", "500,1000,2000", "--depths", "0,0.5,1",
                          "--trials", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    assert set(table) == {"0.00", "0.50", "1.00"}
    assert [r[0] for r in table.values()] == ["1.00", "1.00", "1.00"]  # 500 tokens: always found
    assert table["1.00"][2] == "0.00"  # 2000 tokens, passkey at the end: beyond what the model sees
    assert table["0.00"][2] == "1.00"
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == "standin-7b-chat" and len(data["trials"]) == 27
    assert {(c["length"], c["depth"]): c["accuracy"] for c in data["cells"]}[(2000, 1.0)] == 0.0
    assert png_size(out / "heatmap.png") == HEATMAP_SIZE_PX
    assert f"wrote {out / 'results.json'}" in proc.stdout
    # Progress on stderr (not a terminal here): one line per cell, no carriage returns.
    assert proc.stderr.count("passkey found") == 9 and "\r" not in proc.stderr


@pytest.mark.parametrize(("flags", "needle"), [
    (["--depths", "0,1.5"], "--depths '1.5'"),
    (["--lengths", "abc"], "--lengths 'abc'"),
    (["--lengths", "1x,2x"], "--native"),
    (["--trials", "0"], "--trials '0'"),
])
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, flags, needle, no_key_env):
    out = tmp_path / "never"
    proc = run_launch("probe", "--url", closed_port_url(), "--lengths", "500", *flags, "--out", str(out),
                      cwd=str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ") and needle in lines[0], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unreachable_url_is_one_line_naming_it(tmp_path, no_key_env):
    url = closed_port_url()
    proc = run_launch("probe", "--url", url, "--lengths", "500", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and url in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_api_key_from_flag_or_environment(tmp_path, monkeypatch, no_key_env):
    with ProbeStandin(visible=1000, api_keys=("sesame",)) as server:
        args = ("probe", "--url", server.url, "--lengths", "500", "--depths", "0", "--trials", "1")
        missing = run_launch(*args, "--out", str(tmp_path / "a"))
        by_env = run_launch(*args, "--out", str(tmp_path / "b"), env={"LAUNCH_API_KEY": "sesame"})
        by_flag = run_launch(*args, "--out", str(tmp_path / "c"), "--api-key", "sesame")
    assert missing.returncode == 1 and not (tmp_path / "a").exists()
    assert "pass --api-key or set LAUNCH_API_KEY" in missing.stderr
    assert by_env.returncode == 0 and by_flag.returncode == 0, by_env.stderr + by_flag.stderr
    assert "sesame" not in (tmp_path / "b" / "results.json").read_text()


def test_min_accuracy_fails_the_run_but_keeps_the_results(tmp_path, no_key_env):
    with ProbeStandin(visible=1000) as server:
        proc = run_launch("probe", "--url", server.url, "--lengths", "500,2000", "--depths", "1", "--trials", "1",
                          "--min-accuracy", "0.9", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "below --min-accuracy 0.9" in proc.stderr and (tmp_path / "o" / "results.json").exists()


def test_preset_gives_the_native_context(tmp_path, no_key_env):
    from launcher.model.presets import get_preset

    native = get_preset("llama-3-8b-instruct").native_context
    with ProbeStandin(visible=100_000, session_len=100_000) as server:
        proc = run_launch("probe", "--url", server.url, "--preset", "llama-3-8b-instruct", "--lengths", "0.0625x",
                          "--depths", "0", "--trials", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["settings"]["lengths"] == [round(native * 0.0625)] and data["settings"]["native_context"] == native


def test_existing_results_are_not_overwritten(tmp_path, no_key_env):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.json").write_text("{}")
    proc = run_launch("probe", "--url", closed_port_url(), "--lengths", "500", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "already holds results.json" in proc.stderr
    assert (tmp_path / "o" / "results.json").read_text() == "{}"


def test_ctrl_c_mid_sweep_writes_partial_results(tmp_path, no_key_env):
    out = tmp_path / "o"
    with ProbeStandin(visible=1000, chat_delay=0.3) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "probe", "--url", server.url, "--lengths", "500,1000",
             "--depths", "0,1", "--trials", "5", "--out", str(out)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        deadline = time.monotonic() + 30
        while len(server.prompts) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] is True and data["complete"] is False
    assert 2 <= len(data["trials"]) < 20
    assert (out / "heatmap.png").exists() and "interrupted:" in stdout


def test_out_that_cannot_be_written_is_refused_before_the_sweep(tmp_path, no_key_env):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with ProbeStandin(visible=1000) as server:
        proc = run_launch("probe", "--url", server.url, "--lengths", "500", "--out", str(blocker / "out"))
        assert server.prompts == []  # refused before any trial
    assert_one_line_error(proc, "--out", "is a file, not a directory", code=2)
    assert blocker.read_text() == "mine"
