"""The supervised server: port check, API keys, readiness, failures while starting, clean stops.

Everything runs for real: the server is ``tests/support/standin_openai.py`` (a stand-in for lmdeploy's
api_server process, which needs a GPU) in a real subprocess on a free 127.0.0.1 port; signals go to
a real parent process (a small driver that calls ``run_supervised`` the way ``launch serve`` will).
Every test that starts a server checks that no process of it is left.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from launcher.net.lmdeploy import health_status, health_url_for, served_models, wait_healthy
from launcher.rules.checks import BadOption
from launcher.runtime.address import check_port_free, exposure_warnings, is_loopback, openai_base_url
from launcher.runtime.apikeys import ApiKeyFileError, BadApiKey, resolve_api_keys
from launcher.runtime.ports import PortBusy
from launcher.runtime.process import ServerNotStarted, read_log_tail
from launcher.runtime.progress import StartProgress
from launcher.runtime.supervise import (
    SeamsForTests,
    ServerDied,
    ServerStartFailed,
    ServerStartTimeout,
    run_supervised,
)
from tests.conftest import REPO, assert_one_line_error, free_port
from tests.support.servers import JSONHandler, serving

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

STANDIN = REPO / "tests" / "support" / "standin_openai.py"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

DRIVER = """
import json, sys
from launcher.errors import LaunchError
from launcher.runtime.supervise import SeamsForTests, run_supervised

def on_ready(info):
    print("READY", info.pid, info.base_url, flush=True)

opts = json.loads(sys.argv[2])
seams = SeamsForTests(grace_s=opts.pop("grace_s"))
try:
    rc = run_supervised(json.loads(sys.argv[1]), on_ready=on_ready, seams=seams, **opts)
except LaunchError as err:
    print(f"launch: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
print("STOPPED", rc, flush=True)
sys.exit(rc)
"""


# --- helpers -----------------------------------------------------------------------------------


def standin(port: int, *flags: str) -> list[str]:
    return [sys.executable, str(STANDIN), "--port", str(port), *flags]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def standin_pids(log: Path) -> tuple[int, int | None]:
    """(server pid, helper pid or None) as the stand-in logged them."""
    text = log.read_text()
    server = int(re.search(r"standin: pid (\d+)", text).group(1))
    helper = re.search(r"standin: child pid (\d+)", text)
    return server, int(helper.group(1)) if helper else None


def get(url: str, headers: dict | None = None, data: bytes | None = None):
    """(status, content-type, body) of a request, errors included."""
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with NO_PROXY.open(request, timeout=5) as response:
            return response.status, response.headers.get("content-type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("content-type"), exc.read().decode()


def supervise(tmp_path: Path, port: int, *flags: str, **kwargs):
    """run_supervised on the stand-in, in this process; returns (exit code, ReadyInfo or None)."""
    seen = []
    seams = SeamsForTests(grace_s=kwargs.pop("grace_s", 2.0),
                          progress_stream=kwargs.pop("progress_stream", io.StringIO()),
                          progress_every_s=kwargs.pop("progress_every_s", 10.0),
                          stop_after_probe=kwargs.pop("stop_after_probe", False))
    kwargs.setdefault("health_timeout_s", 20.0)
    rc = run_supervised(standin(port, *flags), host="127.0.0.1", port=port, log_path=tmp_path / "server.log",
                        on_ready=seen.append, seams=seams, **kwargs)
    return rc, (seen[0] if seen else None)


class Driver:
    """A ``launch``-like parent process running ``run_supervised`` on the stand-in."""

    def __init__(self, tmp_path: Path, port: int, *flags: str, **opts) -> None:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        self.log = tmp_path / "server.log"
        opts = {"host": "127.0.0.1", "port": port, "log_path": str(self.log), "grace_s": 2.0,
                "health_timeout_s": 20.0, **opts}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.stderr_path = tmp_path / "driver.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), json.dumps(standin(port, *flags)), json.dumps(opts)],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"driver never printed {prefix!r}; stderr: {self.stderr()}") from None
            if line.startswith(prefix):
                return line

    def printed(self, prefix: str) -> bool:
        """Whether a line starting with ``prefix`` was printed (and not yet consumed by wait_for)."""
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        return any(line.startswith(prefix) for line in lines)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.log.exists() and text in self.log.read_text()):
            assert time.monotonic() < deadline, f"{text!r} never reached the server log"
            time.sleep(0.05)

    def exit_code(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


# --- API keys ----------------------------------------------------------------------------------


def test_keys_merge_flags_env_and_file_in_order_without_duplicates(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\n\nc3\n  d4  \nb2\n")
    keys = resolve_api_keys(["a1", "b2"], key_file=key_file, environ={"LAUNCH_API_KEYS": "b2, c3"})
    assert keys == ["a1", "b2", "c3", "d4"]
    assert type(keys) is list


def test_keys_are_always_a_list_never_a_string(monkeypatch):
    monkeypatch.setenv("LAUNCH_API_KEYS", "secret")
    keys = resolve_api_keys(None)
    assert keys == ["secret"] and type(keys) is list  # one key, not six one-character keys
    assert resolve_api_keys(["secret"], environ={}) == ["secret"]
    with pytest.raises(TypeError):
        resolve_api_keys("secret", environ={})  # a string where the flags list belongs
    with pytest.raises(TypeError):
        run_supervised(["true"], host="127.0.0.1", port=free_port(), log_path="unused.log", api_keys="secret")


def test_no_keys_anywhere_is_none(monkeypatch):
    assert resolve_api_keys(None, environ={}) is None
    assert resolve_api_keys([], environ={"LAUNCH_API_KEYS": "  "}) is None
    monkeypatch.setenv("OTHER_KEYS", "x1,x2")
    assert resolve_api_keys(None, env_var="OTHER_KEYS") == ["x1", "x2"]


@pytest.mark.parametrize(
    ("flags", "env", "source", "problem"),
    [
        ([""], "", "--api-key #1", "is empty"),
        (["ok", "has space"], "", "--api-key #2", "whitespace"),
        ([], "a1,,b2", "LAUNCH_API_KEYS entry 2", "is empty"),
        (["clé-secrète"], "", "--api-key #1", "printable ASCII"),
    ],
)
def test_bad_keys_name_their_source_but_never_the_key(flags, env, source, problem):
    with pytest.raises(BadApiKey) as caught:
        resolve_api_keys(flags, environ={"LAUNCH_API_KEYS": env})
    message = str(caught.value)
    assert source in message and problem in message
    assert caught.value.exit_code == 2
    for key in flags:
        if key:
            assert key not in message


def test_key_file_problems(tmp_path):
    with pytest.raises(ApiKeyFileError, match="no such file"):
        resolve_api_keys(None, key_file=tmp_path / "missing.txt", environ={})
    with pytest.raises(ApiKeyFileError, match="directory"):
        resolve_api_keys(None, key_file=tmp_path, environ={})
    only_comments = tmp_path / "empty.txt"
    only_comments.write_text("# nothing yet\n\n")
    with pytest.raises(ApiKeyFileError, match="holds no key"):
        resolve_api_keys(None, key_file=only_comments, environ={})
    bad_line = tmp_path / "bad.txt"
    bad_line.write_text("good\nkey with spaces\n")
    with pytest.raises(BadApiKey, match="bad.txt line 2"):
        resolve_api_keys(None, key_file=bad_line, environ={})


# --- host and port -----------------------------------------------------------------------------


def test_busy_port_is_refused_before_anything_starts(tmp_path):
    port = free_port()
    marker = tmp_path / "started"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(PortBusy) as caught:
            check_port_free("127.0.0.1", port)
        assert str(port) in str(caught.value) and "--port" in str(caught.value)
        with pytest.raises(PortBusy):
            run_supervised([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], host="127.0.0.1", port=port,
                           log_path=tmp_path / "server.log", seams=SeamsForTests(progress_stream=io.StringIO()))
    assert not marker.exists() and not (tmp_path / "server.log").exists()
    assert check_port_free("127.0.0.1", port) == port  # free again once the holder is gone


def test_busy_port_held_by_a_server_says_so():
    class Healthy(JSONHandler):
        def do_GET(self):
            self.send_json(200, {"status": "healthy"})

    with serving(Healthy) as server, pytest.raises(PortBusy, match="another `launch serve`"):
        check_port_free("127.0.0.1", server.server_address[1])


def test_free_ports_gives_a_run_that_can_be_bound_and_says_when_there_is_none():
    from launcher.runtime.address import free_ports

    first = free_ports(3)
    held = []
    try:
        for port in range(first, first + 3):
            held.append(socket.socket())
            held[-1].bind(("127.0.0.1", port))
        assert [sock.getsockname()[1] for sock in held] == [first, first + 1, first + 2]
    finally:
        for sock in held:
            sock.close()
    assert check_port_free("127.0.0.1", first) == first  # let go again
    with pytest.raises(OSError, match="no 70000 free ports in a row on 127.0.0.1"):
        free_ports(70000)


@pytest.mark.parametrize("port", [0, 65536, -1, "http", True, "", "²", "٣", "８０", "+80", "80.0", "0x50",
                                  "1_000", "8 0", "1" * 5000, "99999999999999999999"])
def test_bad_port_values(port):
    with pytest.raises(BadOption) as caught:
        check_port_free("127.0.0.1", port)
    assert caught.value.option == "--port" and caught.value.exit_code == 2
    assert len(str(caught.value)) < 200  # one readable line, whatever was given


@pytest.mark.parametrize("host", ["", "  ", "192.0.2.1", "no such host.invalid", "a" * 300, "x" * 64 + ".com",
                                  "bad\x00host", "tab\thost", "hôte.local"])
def test_bad_host_values(host):
    with pytest.raises(BadOption) as caught:
        check_port_free(host, free_port())
    assert caught.value.option == "--host"
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 250


@pytest.mark.parametrize("port", ["²", "1" * 5000])
def test_odd_port_on_the_command_line_is_one_line(launch, port):
    result = launch("serve", "internlm2_5-7b-chat", "--dry-run", "--port", port)
    assert_one_line_error(result, "--port", "must be a whole number from 1 to", code=2)


@pytest.mark.parametrize(("host", "keys", "loopback"), [
    ("127.0.0.1", False, True), ("127.0.0.2", False, True), ("localhost", False, True),
    ("::1", False, True), ("[::1]", False, True), ("127.1", False, True), ("::ffff:127.0.0.1", False, True),
    ("0.0.0.0", False, False), ("::", False, False), ("192.168.1.5", False, False), ("gpu-box", False, False),
    ("0.0.0.0", True, False), ("0", False, False), ("localhost.evil.com", False, False),
])
def test_binding_beyond_loopback_warns(host, keys, loopback):
    """One rule: the OpenAI API open without a key; and for a proxy its node API, open whatever keys."""
    assert is_loopback(host) == loopback
    lines = exposure_warnings(host, 8000, keys)
    assert len(lines) == (0 if loopback or keys else 1)
    for line in lines:
        assert "\n" not in line and host in line and "LAUNCH_API_KEYS" in line and "--api-key-file" in line
        assert "OpenAI API" in line and "8000" in line
    proxy = exposure_warnings(host, 8000, keys, node_api=True)
    assert proxy[:len(lines)] == lines and len(proxy) == len(lines) + (0 if loopback else 1)
    assert all("node API" in line for line in proxy[len(lines):])


def test_serve_warns_once_when_it_exposes_a_server_without_keys(model_dir, tmp_path, monkeypatch, capsys):
    """The real serve path up to the server start (a command that exits at once stands in for the
    engine, so the run ends with the server's own error after the warning)."""
    from launcher.app.serve import ServeRequest, serve
    from launcher.plan.build import PlanRequest
    from launcher.runtime import gpu

    monkeypatch.setattr(gpu, "nvidia_problem", lambda: None)  # STAND-IN seam: pretend a GPU
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    request = ServeRequest(plan=PlanRequest(model=str(model_dir), factor="2", backend="pytorch", host="0.0.0.0",
                                            port=free_port()), health_timeout_s=10)
    with pytest.raises(ServerStartFailed):
        serve(request, server_argv=(sys.executable, "-c", "import sys; sys.exit(3)"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no API key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --host 0.0.0.0 ")


def test_api_key_help_warns_about_ps(launch):
    result = launch("serve", "--help")
    text = " ".join(result.stdout.split())
    assert "Visible to other users in `ps`" in text and "LAUNCH_API_KEYS" in text and "--api-key-file" in text


def test_urls_for_wildcard_and_ipv6_hosts():
    assert openai_base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/v1"
    assert openai_base_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/v1"
    assert openai_base_url("::", 8000) == "http://[::1]:8000/v1"
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/", "http://h:1/health"):
        assert health_url_for(url) == "http://h:1/health"


# --- starting ----------------------------------------------------------------------------------


def test_ready_after_slow_load_with_closed_port(tmp_path):
    port = free_port()
    progress = io.StringIO()
    seen = {}

    def probe(info):
        seen["models"] = get(info.base_url + "/models")

    rc, info = supervise(tmp_path, port, "--load-seconds", "1", probe=probe, stop_after_probe=True,
                         progress_stream=progress, progress_every_s=0.2)
    assert rc == 0
    assert info.base_url == f"http://127.0.0.1:{port}/v1" and info.model_name == "standin-model"
    assert seen["models"][0] == 200 and json.loads(seen["models"][2])["data"][0]["id"] == "standin-model"
    shown = progress.getvalue()
    assert "loading weights" in shown  # the last log line, shown while the port was still closed
    assert "is healthy" in shown
    log = (tmp_path / "server.log").read_text()
    assert "/health" in log.split("Uvicorn running")[1]  # health was only answered after binding
    assert not pid_alive(info.pid)


def test_health_503_is_not_ready(tmp_path):
    port = free_port()
    statuses = []
    rc, info = supervise(tmp_path, port, "--unhealthy-seconds", "0.8",
                         probe=lambda info: statuses.append(get(info.health_url)[0]), stop_after_probe=True)
    assert rc == 0 and statuses == [200]
    log = (tmp_path / "server.log").read_text()
    assert '"GET /health HTTP/1.1" 503' in log and '"GET /health HTTP/1.1" 200' in log
    assert log.index('"GET /health HTTP/1.1" 503') < log.index('"GET /health HTTP/1.1" 200')
    assert not pid_alive(info.pid)


def test_start_timeout_stops_the_server(tmp_path):
    port = free_port()
    with pytest.raises(ServerStartTimeout) as caught:
        supervise(tmp_path, port, "--load-seconds", "30", "--spawn-child", health_timeout_s=1.5)
    message = str(caught.value)
    assert "--health-timeout" in message and "1.5 s" in message and "loading weights" in message
    server, helper = standin_pids(tmp_path / "server.log")
    assert wait_gone(server, 1) and wait_gone(helper, 1)


def test_crash_while_starting_reports_exit_code_and_log_tail(tmp_path):
    port = free_port()
    with pytest.raises(ServerStartFailed) as caught:
        supervise(tmp_path, port, "--die-after", "0.2", "--exit-code", "3", "--spawn-child")
    err = caught.value
    assert err.returncode == 3
    assert err.tail[-1] == "RuntimeError: stand-in failure while loading weights"
    assert len(err.tail) <= 20
    message = str(err)
    assert message.startswith("the server exited with code 3 while starting")
    assert "RuntimeError: stand-in failure" in message and str(tmp_path / "server.log") in message
    server, helper = standin_pids(tmp_path / "server.log")
    assert not pid_alive(server) and wait_gone(helper, 1)  # its worker process is swept too


def test_command_that_cannot_start(tmp_path):
    with pytest.raises(ServerNotStarted, match="no-such-engine"):
        run_supervised([str(tmp_path / "no-such-engine")], host="127.0.0.1", port=free_port(),
                       log_path=tmp_path / "server.log", seams=SeamsForTests(progress_stream=io.StringIO()))


# --- ready: what the user gets -----------------------------------------------------------------


def test_metrics_and_chat_through_the_ready_url(tmp_path):
    port = free_port()
    seen = {}

    def probe(info):
        body = json.dumps({"model": info.model_name, "messages": [{"role": "user", "content": "hi there"}]})
        seen["chat"] = get(info.base_url + "/chat/completions", {"Content-Type": "application/json"},
                           body.encode())
        seen["metrics"] = get(info.metrics_url)

    rc, info = supervise(tmp_path, port, probe=probe, stop_after_probe=True)
    assert rc == 0
    status, _, body = seen["chat"]
    assert status == 200
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    status, content_type, text = seen["metrics"]
    assert status == 200 and content_type.startswith("text/plain")
    success = r'^lmdeploy:request_success_total\{[^}]*model_name="standin-model"[^}]*\} 1\.0$'
    assert re.search(success, text, re.MULTILINE)
    assert not pid_alive(info.pid)


def test_api_keys_reach_the_server_as_a_list_and_stay_secret(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("k-two\n")
    keys = resolve_api_keys(["k-one"], key_file=key_file, environ={})
    port = free_port()
    seen = {}

    def probe(info):
        seen["no key"] = get(info.base_url + "/models")[0]
        seen["wrong key"] = get(info.base_url + "/models", {"Authorization": "Bearer k"})[0]
        seen["second key"] = get(info.base_url + "/models", {"Authorization": "Bearer k-two"})[0]
        seen["probe headers"] = get(info.base_url + "/models", info.headers())[0]
        seen["health open"] = get(info.health_url)[0]
        seen["metrics with key"] = get(info.metrics_url, info.headers())[0]

    rc, info = supervise(tmp_path, port, "--api-keys", ",".join(keys), api_keys=keys, probe=probe,
                         stop_after_probe=True)
    assert rc == 0
    assert seen == {"no key": 401, "wrong key": 401, "second key": 200, "probe headers": 200,
                    "health open": 200, "metrics with key": 200}
    assert info.model_name == "standin-model"  # looked up through /v1/models with a key
    curl = info.curl_example()
    assert 'Authorization: Bearer $LAUNCH_API_KEY' in curl
    printed = "\n".join(info.summary_lines()) + repr(info)
    assert "k-one" not in printed and "k-two" not in printed
    assert info.base_url in printed


def test_curl_example_without_keys_has_no_auth_header(tmp_path):
    port = free_port()
    rc, info = supervise(tmp_path, port, "--host", "127.0.0.1", probe=lambda info: None,
                         stop_after_probe=True)
    assert rc == 0
    curl = info.curl_example()
    assert "Authorization" not in curl
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in curl and '"model": "standin-model"' in curl


def test_health_waits_have_a_deadline_against_a_silent_server():
    """A port that accepts and never answers (a hung server) is 'not healthy' within the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert health_status(url + "/health", timeout=0.5) is None
        assert served_models(url, timeout=0.5) == []
        assert wait_healthy(url, 0.8) is False
        assert time.monotonic() - started < 0.5 + 0.5 + 0.8 + 20  # the server never answers: ending is the point


def test_supervisor_modules_use_the_one_http_client():
    import ast

    for name in ("runtime/supervise", "runtime/address", "net/lmdeploy", "runtime/process", "runtime/progress",
                 "runtime/ready"):
        tree = ast.parse((REPO / "launcher" / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
        assert not {m for m in imported if m.split(".")[0] in ("urllib", "httpx", "requests", "http")}, name


def test_wait_healthy(tmp_path):
    port = free_port()
    assert wait_healthy(f"http://127.0.0.1:{port}/v1", 0.3) is False  # nothing listens
    proc = subprocess.Popen(standin(port, "--load-seconds", "0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}/v1", 15) is True
    finally:
        proc.terminate()
        proc.wait(5)


# --- after ready -------------------------------------------------------------------------------


def test_server_dying_after_ready_is_an_error_with_its_log(tmp_path):
    port = free_port()
    with pytest.raises(ServerDied) as caught:
        supervise(tmp_path, port, probe=lambda info: os.kill(info.pid, signal.SIGKILL))
    assert caught.value.returncode == -signal.SIGKILL
    message = str(caught.value)
    assert "killed by SIGKILL" in message and "Uvicorn running" in message


def test_failing_probe_stops_the_server(tmp_path):
    port = free_port()
    pids = []

    def probe(info):
        pids.append(info.pid)
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        supervise(tmp_path, port, probe=probe)
    assert pids and not pid_alive(pids[0])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launch_stops_the_server_cleanly(tmp_path, signum):
    driver = Driver(tmp_path, free_port(), "--spawn-child")
    server = int(driver.wait_for("READY").split()[1])
    _, helper = standin_pids(driver.log)
    assert pid_alive(server) and pid_alive(helper)
    driver.proc.send_signal(signum)
    assert driver.exit_code() == 0
    assert driver.wait_for("STOPPED") == "STOPPED 0"
    assert not pid_alive(server) and wait_gone(helper, 1)
    assert "Shutting down" in driver.log.read_text()  # it was asked, not killed


def test_signal_while_loading_stops_the_server(tmp_path):
    driver = Driver(tmp_path, free_port(), "--load-seconds", "30")
    driver.wait_log("loading weights")
    server, _ = standin_pids(driver.log)
    driver.proc.send_signal(signal.SIGINT)
    assert driver.exit_code() == 0
    assert wait_gone(server, 1)
    assert driver.wait_for("STOPPED") == "STOPPED 0"
    assert not driver.printed("READY")


def test_server_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    driver = Driver(tmp_path, free_port(), "--ignore-sigterm", grace_s=0.5)
    server = int(driver.wait_for("READY").split()[1])
    driver.proc.send_signal(signal.SIGTERM)
    assert driver.exit_code() == 0
    assert not pid_alive(server)
    assert "Shutting down" not in driver.log.read_text()  # it never stopped by itself


def test_launch_killed_outright_takes_the_server_with_it(tmp_path):
    driver = Driver(tmp_path, free_port())
    server = int(driver.wait_for("READY").split()[1])
    driver.proc.kill()  # SIGKILL: no handler of launch runs
    driver.exit_code()
    assert wait_gone(server, 5)


def test_startup_errors_reach_the_user_as_one_error_line_and_exit_code(tmp_path):
    driver = Driver(tmp_path, free_port(), "--die-after", "0.1", "--exit-code", "7")
    assert driver.exit_code() == 1
    stderr = driver.stderr()
    assert "launch: error: the server exited with code 7 while starting" in stderr
    assert "  | RuntimeError: stand-in failure while loading weights" in stderr


# --- progress and log tail ---------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal(tmp_path):
    terminal = _Terminal()
    progress = StartProgress(terminal, log_path=tmp_path / "server.log")
    progress.update(3.0, "loading weights: 1/4")
    progress.update(4.0, "loading weights: 2/4")
    progress.done(5.0)
    text = terminal.getvalue()
    assert text.count("\n") == 2  # the opening line and the final one; updates stay on one line
    assert "\r\x1b[Klaunch: loading…    4 s | loading weights: 2/4" in text


def test_progress_prints_a_line_now_and_then_elsewhere(tmp_path):
    stream = io.StringIO()
    progress = StartProgress(stream, log_path=tmp_path / "server.log", every_s=10)
    for second in range(25):
        progress.update(float(second), f"line {second}")
    lines = stream.getvalue().splitlines()
    assert lines[1:] == ["launch: still starting after 10 s: line 10",
                         "launch: still starting after 20 s: line 20"]
    assert "\r" not in stream.getvalue()


def test_log_tail_is_readable(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"old run\n" + b"".join(b"line %d\n" % i for i in range(30))
                    + b"\x1b[93mcoloured\x1b[0m\nbar 10%\rbar 50%\rbar 100%\n\n")
    tail = read_log_tail(log, 5, start=len(b"old run\n"))
    assert tail == ["line 27", "line 28", "line 29", "coloured", "bar 100%"]
    assert "old run" not in read_log_tail(log, 100, start=len(b"old run\n"))
