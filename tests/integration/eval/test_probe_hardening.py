"""``launch probe`` against hostile servers, as a real subprocess: every request ends at ``--timeout``,
progress shows before the first answer, Ctrl-C keeps what ran, credentials never show, and a
proxy's HTTP-200 error bodies count as errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.support.probe_standin import ProbeStandin
from tests.support.servers import RawServer

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


@pytest.fixture(autouse=True)
def no_key_env(monkeypatch):
    monkeypatch.delenv("LAUNCH_API_KEY", raising=False)


def start_probe(*args: str, cwd) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "launcher", "probe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(cwd))


@pytest.mark.parametrize("behaviour", ["silent", "drip"], ids=["accepts-never-answers", "one-byte-a-second"])
def test_a_server_that_never_finishes_ends_within_the_timeout(tmp_path, behaviour):
    with RawServer(behaviour) as server:
        start = time.monotonic()
        proc = start_probe("--url", server.url, "--lengths", "100", "--timeout", "3", "--out", "o", cwd=tmp_path)
        first_line = proc.stderr.readline()
        running_after_first_line = proc.poll() is None
        stdout, rest = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    # The first progress line comes while it still waits (there is no answer), before the deadline ends it.
    assert first_line.startswith("launch: waiting for " + server.url) and "3 s deadline" in first_line
    assert running_after_first_line
    assert elapsed < 3 + 30, elapsed  # the server never finishes: ending is the point
    assert proc.returncode == 1
    assert rest.strip() == f"launch: error: {server.url}/v1/models did not answer within 3 s."
    assert stdout == "" and not (tmp_path / "o").exists()


def test_ctrl_c_stops_at_once_and_writes_the_trials_so_far(tmp_path):
    # Two cells of one trial answer, the third prompt hangs: Ctrl-C while it waits.
    with ProbeStandin(visible=1000, hang_after=2) as server:
        proc = start_probe("--url", server.url, "--lengths", "500", "--depths", "0,0.5,1", "--trials", "1",
                           "--out", "o", cwd=tmp_path)
        seen = []
        while len([line for line in seen if "passkey found" in line]) < 2:
            line = proc.stderr.readline()
            assert line, "".join(seen)
            seen.append(line)
        deadline = time.monotonic() + 10
        while len(server.prompts) < 3 and time.monotonic() < deadline:  # the third prompt is waiting
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=120)  # then it writes the results and the heatmap
        hung_up = list(server.hung_up_at)
    # It gives up the waiting request at once (the answer would never come).
    assert hung_up and hung_up[0] - sent < 2.0, (hung_up, sent)
    assert proc.returncode == 130
    assert "interrupted; partial results written" in rest and "Traceback" not in rest
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["interrupted"] is True and data["complete"] is False and len(data["trials"]) == 2
    assert (tmp_path / "o" / "heatmap.png").stat().st_size > 0
    assert "interrupted: 2 of 3 trials ran" in stdout


def test_basic_auth_from_the_url_works_and_the_password_never_shows(tmp_path):
    with ProbeStandin(visible=1000, basic_auth=("user", "PASSWORD")) as server:
        url = server.url.replace("http://", "http://user:PASSWORD@")
        proc = start_probe("--url", url, "--lengths", "500", "--depths", "0", "--trials", "1", "--out", "o",
                           cwd=tmp_path)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert server.auth_headers and all(h.startswith("Basic ") for h in server.auth_headers)
        # Without the credentials the same server refuses: one line, no password anywhere.
        bad = url.replace("PASSWORD", "WRONGPASSWORD")
        refused = start_probe("--url", bad, "--lengths", "500", "--out", "o2", cwd=tmp_path)
        _, refused_err = refused.communicate(timeout=60)
    results = (tmp_path / "o" / "results.json").read_text()
    assert json.loads(results)["overall_accuracy"] == 1.0
    assert json.loads(results)["settings"]["url"] == server.url
    for text in (stdout, stderr, results, refused_err):
        assert "PASSWORD" not in text
    assert refused.returncode == 1 and refused_err.count("\n") == 1
    assert refused_err.startswith(f"launch: error: {server.url} needs an API key (HTTP 401)")


def test_a_proxys_http_200_error_body_is_an_error_not_an_answer(tmp_path):
    with ProbeStandin(visible=1000, proxy_error=True) as server:
        proc = start_probe("--url", server.url, "--lengths", "500", "--depths", "0,1", "--trials", "1",
                           "--out", "o", cwd=tmp_path)
        stdout, stderr = proc.communicate(timeout=60)
    # Nothing was answered: written, shown, and exit 3 so that a script cannot take it for a pass.
    assert proc.returncode == 3, stderr
    assert stderr.splitlines()[-1] == ("launch: error: no trial was answered: all 2 failed, e.g. error_code 10402: "
                                       "Failed to get response after a period of time (details in o/results.json).")
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [t["answer"] for t in data["trials"]] == [None, None]
    assert all("error_code 10402" in t["error"] and not t["correct"] for t in data["trials"])
    assert [c["errors"] for c in data["cells"]] == [1, 1]
    assert "ERR" in stdout and "error_code 10402: Failed to get response" in stdout
