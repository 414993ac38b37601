"""The one supervisor (``runtime.supervise.Supervisor``) over N real server processes: waited for in
order, watched together, and all stopped by the one stop policy on a signal or on the first exit.

The servers are ``tests/support/standin_openai.py`` (a STAND-IN for lmdeploy's api_server, which
needs a GPU) in real subprocesses on free 127.0.0.1 ports. The supervisor runs in this test's main
thread, so its signal handlers are the real ones; signals come from ``os.kill`` of this process.
Every test checks that no process of any server is left.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.runtime.process import ServerProcess
from launcher.runtime.supervise import (
    ServerDied,
    ServerStartFailed,
    ServerStartTimeout,
    Supervised,
    Supervisor,
)
from tests.conftest import REPO, free_port
from tests.integration.serve.test_supervise import Driver, pid_alive, standin, standin_pids, wait_gone

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def member(tmp_path: Path, name: str, *flags: str, timeout_s: float = 30.0, when_ready=None) -> Supervised:
    port = free_port()
    server = ServerProcess(standin(port, *flags), log_path=tmp_path / f"{name}.log")
    return Supervised(server, f"http://127.0.0.1:{port}/health", timeout_s, when_ready=when_ready)


def supervisor(members: list[Supervised], grace_s: float = 5.0) -> Supervisor:
    return Supervisor(members, grace_s=grace_s, progress_stream=io.StringIO())


def sigterm_times(log: Path) -> list[float]:
    return [float(t) for t in re.findall(r"standin: SIGTERM ignored at (\S+)", log.read_text())]


def group_of(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group ``pgid``, found independently of launch's code."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except (OSError, psutil.Error):
            continue
    return found


def all_gone(members: list[Supervised]) -> bool:
    """No process of any member is left: neither its leader nor anything in its process group."""
    return all(m.process.poll() is not None and group_of(m.process.pid) == [] for m in members)


def test_each_is_ready_in_order_then_one_signal_stops_them_all(tmp_path):
    order: list[str] = []
    members = [member(tmp_path, "a", "--load-seconds", "1.0", when_ready=lambda: order.append("a")),
               member(tmp_path, "b", when_ready=lambda: order.append("b")),
               member(tmp_path, "c", "--spawn-child", when_ready=lambda: order.append("c"))]
    with supervisor(members) as run:
        run.start()
        assert run.wait_ready() is True
        # b and c were up long before a: each is still ready only after those before it
        assert order == ["a", "b", "c"]
        _, helper = standin_pids(members[2].process.log_path)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag: no exception here
        assert run.watch() == 0
    assert all_gone(members) and wait_gone(helper, 5)
    for m in members:  # each was asked to stop, not killed
        assert "Shutting down" in m.process.log_path.read_text()
        assert m.process.poll() == 0


def test_the_first_exit_stops_the_others_and_names_its_log(tmp_path):
    members = [member(tmp_path, name) for name in ("a", "b", "c")]
    with pytest.raises(ServerDied) as caught, supervisor(members) as run:
        run.start()
        assert run.wait_ready()
        os.kill(members[1].process.pid, signal.SIGKILL)
        run.watch()
    assert caught.value.returncode == -signal.SIGKILL
    assert caught.value.log_path == str(tmp_path / "b.log") and "killed by SIGKILL" in str(caught.value)
    assert all_gone(members)
    for name in ("a", "c"):
        assert "Shutting down" in (tmp_path / f"{name}.log").read_text()


def test_one_grace_period_for_all_then_sigkill(tmp_path):
    """Three servers that ignore SIGTERM: each is sent SIGTERM before any grace period has run out
    (one grace period for all, not one after the other), then each is killed."""
    grace = 4.0
    members = [member(tmp_path, name, "--ignore-sigterm") for name in ("a", "b", "c")]
    with supervisor(members, grace_s=grace) as run:
        run.start()
        assert run.wait_ready()
        os.kill(os.getpid(), signal.SIGINT)
        assert run.watch() == 0
    times = [sigterm_times(m.process.log_path) for m in members]
    assert all(len(t) == 1 for t in times), times  # one SIGTERM each, however many processes it has
    assert max(t[0] for t in times) - min(t[0] for t in times) < grace
    assert [m.process.poll() for m in members] == [-signal.SIGKILL] * 3
    assert all_gone(members)


def test_a_second_signal_skips_the_grace_period(tmp_path):
    """In a launch-like parent: a server ignoring SIGTERM, a grace period of 10 minutes; the second
    SIGTERM ends the wait (the run would otherwise outlast the 60 s this test waits)."""
    driver = Driver(tmp_path, free_port(), "--ignore-sigterm", grace_s=600.0)
    server = int(driver.wait_for("READY").split()[1])
    driver.proc.send_signal(signal.SIGTERM)
    driver.wait_log("SIGTERM ignored")
    assert pid_alive(server)  # still in its grace period
    driver.proc.send_signal(signal.SIGTERM)
    assert driver.exit_code(timeout=60) == 0
    assert not pid_alive(server)


@pytest.mark.parametrize("how", ["signal", "its own exit"])
def test_a_worker_that_left_the_servers_group_is_stopped_too(tmp_path, how):
    """An engine worker in a session of its own: no signal to the server's group reaches it; the
    supervisor knows it from the server's process tree."""
    members = [member(tmp_path, "a", "--spawn-detached"), member(tmp_path, "b")]
    with pytest.raises(ServerDied) if how == "its own exit" else nullcontext(), supervisor(members) as run:
        run.start()
        assert run.wait_ready()
        detached = int(re.search(r"detached child pid (\d+)", members[0].process.log_path.read_text()).group(1))
        assert os.getpgid(detached) != members[0].process.pid and pid_alive(detached)
        if how == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            os.kill(members[0].process.pid, signal.SIGKILL)  # the server dies; its worker is orphaned
        run.watch()
    assert wait_gone(detached, 5)
    assert all_gone(members)


def test_a_server_that_dies_while_starting_stops_the_others(tmp_path):
    members = [member(tmp_path, "a"), member(tmp_path, "b", "--die-after", "0.5", "--exit-code", "4",
                                             "--spawn-child"),
               member(tmp_path, "c", "--load-seconds", "30")]
    with pytest.raises(ServerStartFailed) as caught, supervisor(members) as run:
        run.start()
        run.wait_ready()
    assert caught.value.returncode == 4 and caught.value.log_path == str(tmp_path / "b.log")
    assert caught.value.tail[-1] == "RuntimeError: stand-in failure while loading weights"
    _, helper = standin_pids(tmp_path / "b.log")
    assert wait_gone(helper, 5) and all_gone(members)


def test_a_ready_server_that_ends_while_another_starts_died_after_it_was_ready(tmp_path):
    first, second = member(tmp_path, "a"), member(tmp_path, "b", "--load-seconds", "60")
    first = replace(first, when_ready=lambda: os.kill(first.process.pid, signal.SIGKILL))
    with pytest.raises(ServerDied) as caught, supervisor([first, second]) as run:
        run.start()
        run.wait_ready()
    assert caught.value.log_path == str(tmp_path / "a.log") and "after it was ready" in str(caught.value)
    assert all_gone([first, second])


def test_each_server_has_its_own_time_and_flag(tmp_path):
    fast = member(tmp_path, "a")
    slow = replace(member(tmp_path, "b", "--load-seconds", "60"), timeout_s=2.0, timeout_flag="--start-timeout")
    with pytest.raises(ServerStartTimeout) as caught, supervisor([fast, slow]) as run:
        run.start()
        run.wait_ready()
    message = str(caught.value)
    assert "within 2 s" in message and "raise --start-timeout" in message and str(tmp_path / "b.log") in message
    assert "loading weights" in message  # its log's last lines
    assert all_gone([fast, slow])


def test_a_stop_signal_while_starting_stops_all_and_is_not_ready(tmp_path):
    def signal_once_b_loads() -> None:  # order, not time: b is loading (its handler is in place) first
        deadline = time.monotonic() + 60
        while "loading weights" not in (tmp_path / "b.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    members = [replace(member(tmp_path, "a"), when_ready=signal_once_b_loads),
               member(tmp_path, "b", "--load-seconds", "60")]
    with supervisor(members) as run:
        run.start()
        assert run.wait_ready() is False
    assert all_gone(members)
    assert "stopped while loading" in (tmp_path / "b.log").read_text()


def test_on_stop_runs_before_the_servers_stop_even_when_it_fails(tmp_path):
    members = [member(tmp_path, "a")]
    seen: list[bool] = []

    def leave() -> None:
        seen.append(members[0].process.poll() is None)  # still running when it is told
        raise RuntimeError("cannot leave")

    with supervisor(members) as run:
        run.start()
        assert run.wait_ready()
        run.on_stop(leave)
    assert seen == [True] and all_gone(members)


NO_PSUTIL = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "psutil":
            raise ImportError("psutil is made unimportable by the test")

sys.meta_path.insert(0, Block())
from launcher.cli import main
try:
    main(sys.argv[1:])
finally:
    print("PSUTIL LOADED" if "psutil" in sys.modules else "NO PSUTIL", file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["plan", "internlm-chat-7b", "--factor", "2"]])
def test_psutil_is_loaded_only_where_processes_run(argv):
    """``launch --help``, ``presets`` and ``plan`` work with psutil unimportable, and never load it."""
    result = subprocess.run([sys.executable, "-c", NO_PSUTIL, *argv], capture_output=True, text=True, timeout=60,
                            check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "NO PSUTIL" and result.stdout.strip()


def test_start_times_come_from_psutil_and_tell_a_pid_used_again():
    from launcher.scaleout.state import SAME_START_S, started

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine, theirs = started(os.getpid()), started(child.pid)
        assert mine is not None and theirs is not None and theirs > mine
        # the kernel's own count (clock ticks after boot), read here only as the oracle
        ticks = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert abs(theirs - ticks / os.sysconf("SC_CLK_TCK")) < SAME_START_S
        assert abs(started(child.pid) - theirs) < SAME_START_S
    finally:
        child.kill()
        child.wait()
    assert started(child.pid) is None


@st.composite
def recorded_starts(draw):
    """What a watchdog record's "started" may hold: this process's start give or take up to 2 s, or
    anything else JSON has (a hand-edited or foreign file)."""
    from launcher.scaleout.state import started

    near = st.floats(-2.0, 2.0).map(lambda offset: started(os.getpid()) + offset)
    junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=2))
    return draw(st.one_of(near, junk))


@settings(max_examples=200, deadline=None)
@given(recorded_starts())
def test_a_record_is_this_processes_only_with_its_start(value):
    """The same pid counts as the writer only when the record's start is this process's (or the
    record does not tell): a pid used again by another process, or a malformed start, does not."""
    from launcher.scaleout.state import SAME_START_S, _is_writer, started

    same = value is None or (type(value) in (int, float) and abs(value - started(os.getpid())) < SAME_START_S)
    assert _is_writer({"pid": os.getpid(), "started": value}, os.getpid()) is same


def test_a_servers_log_is_the_users_alone_and_never_written_through_a_link(tmp_path):
    """A server logs its requests' URLs: its log is 0600 in a 0700 run folder (an older launch's 0644 log
    of the run is tightened), and a link in the log's place is refused in one line, its target untouched."""
    import stat as st

    from launcher.runtime.process import ServerLogNotWritable

    quick = [sys.executable, "-c", "print('up')"]
    run = tmp_path / "runs" / "m-1"
    def ran(log_path: Path) -> None:
        with ServerProcess(quick, log_path=log_path) as server:
            deadline = time.monotonic() + 30
            while server.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)

    ran(run / "server.log")
    assert st.S_IMODE((run / "server.log").stat().st_mode) == 0o600
    assert st.S_IMODE(run.stat().st_mode) == 0o700
    old = tmp_path / "old.log"
    old.write_text("an older launch's log\n")
    old.chmod(0o644)
    ran(old)
    assert st.S_IMODE(old.stat().st_mode) == 0o600 and old.read_text().startswith("an older launch's log\n")
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    (tmp_path / "linked.log").symlink_to(target)
    with pytest.raises(ServerLogNotWritable) as err:
        ServerProcess(quick, log_path=tmp_path / "linked.log").start()
    assert "symbolic link" in str(err.value)
    assert target.read_text() == "mine"
