"""`launch fetch` through the real CLI in a subprocess, against the fake hub on 127.0.0.1; and a
full disk, made real with a tiny tmpfs mounted over HF_HOME in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launcher.runtime.paths import hf_cache_dir, repo_folder
from tests.conftest import REPO, run_launch
from tests.support.fakehub import FakeHub, tiny_repo_files

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def test_fetch_main_path_cache_hit_and_offline(hub):
    first = run_launch("fetch", "org/tiny")
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.splitlines()[-1])
    sha = hub.repos["org/tiny"].refs["main"]
    assert path == hf_cache_dir() / repo_folder("org/tiny") / "snapshots" / sha
    assert (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").exists()
    assert "9 files" in first.stderr and "downloaded" in first.stderr

    hub.reset()
    second = run_launch("fetch", "org/tiny")
    assert second.returncode == 0 and Path(second.stdout.splitlines()[-1]) == path
    assert hub.count() == 1 and "from cache" in second.stderr

    hub.stop()
    offline = run_launch("fetch", "org/tiny", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.splitlines()[-1]) == path and "HF_HUB_OFFLINE" in offline.stderr


def test_quiet_prints_only_the_path(hub):
    done = run_launch("fetch", "org/tiny", "--quiet")
    assert done.returncode == 0
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1 and Path(done.stdout.strip()).is_dir()


def test_errors_are_one_line_with_no_traceback(hub):
    missing = run_launch("fetch", "org/missing")
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [missing.stderr.strip()]
    assert missing.stderr.startswith("launch: error: repository org/missing was not found")
    bad = run_launch("fetch", "org/tiny", "--timeout", "soon")
    assert bad.returncode == 2 and bad.stderr.startswith("launch: error: --timeout 'soon'")
    assert hub.count() == 1  # the bad flag was refused before any request


def test_preset_brings_repo_pinned_revision_and_remote_code(hub, tmp_path):
    sha = hub.repos["org/tiny"].refs["main"]
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny-test.yaml").write_text(textwrap.dedent(f"""\
        name: tiny-test
        repo: org/tiny
        revision: {sha}
        trust_remote_code: true
        native_context: 256
        rope: {{type: dynamic, factor: 2.0}}
        parameters: 1.0e4
        config:
          architectures: [LlamaForCausalLM]
          model_type: llama
          max_position_embeddings: 256
          rope_theta: 10000
          rope_scaling: null
          num_hidden_layers: 1
          hidden_size: 16
          num_attention_heads: 2
          num_key_value_heads: 1
          torch_dtype: float32
        """))
    env = {"LAUNCH_PRESETS_DIR": str(presets)}
    first = run_launch("fetch", "tiny-test", env=env)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.splitlines()[-1])
    assert path.name == sha and (path / "modeling_tiny.py").is_file()
    assert hub.count(contains="/revision/") == 0  # pinned: nothing to resolve
    hub.reset()
    again = run_launch("fetch", "tiny-test", env=env)
    assert again.returncode == 0 and hub.count() == 0
    unknown = run_launch("fetch", "no-such-preset", env=env)
    assert unknown.returncode != 0 and unknown.stderr.startswith("launch: error: no preset")


def test_stalled_hub_ends_the_command(hub):
    """The hub answers the revision request and the file list but never a file request. launch
    gives up at --timeout and the whole command exits (the subprocess timeout would catch a hang):
    huggingface_hub retries a timed-out HEAD with 60 s timeouts, and a snapshot_download pool thread
    stuck there held the finished command for minutes, which is why launch downloads in daemon
    threads of its own. The hub sees the connections close: nothing is left waiting on it."""
    hub.stall(lambda method, path, file: "/resolve/" in path)
    done = run_launch("fetch", "org/tiny", "--timeout", "2", timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "launch: error: the hub at " + hub.url + " gave no complete answer in 2 s while downloading org/tiny@main")
    assert hub.hangups and all("/resolve/" in p for p in hub.hangups)


# --- a full disk ------------------------------------------------------------------------------------
# A real ENOSPC: unshare(1) gives the command a private user + mount namespace where a tmpfs of a few
# hundred kB is mounted over HF_HOME, so writes fail exactly as on a full disk. The same shell then
# enlarges the tmpfs and runs fetch again, proving nothing left behind blocks the next run.


def _namespaces_work(tmp: Path) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{tmp}'"],
                           capture_output=True, timeout=20, check=False)
    return probe.returncode == 0


def _fetch_on_small_disk(tmp_path: Path, hub: FakeHub, size: str) -> subprocess.CompletedProcess:
    home = Path(os.environ["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not _namespaces_work(tmp_path):
        pytest.skip("needs unshare(1) with user and mount namespaces to mount a small tmpfs")
    blobs = home / "hub" / repo_folder("org/big") / "blobs"
    script = textwrap.dedent(f"""\
        mount -t tmpfs -o size={size} tmpfs "$HF_HOME" || exit 97
        "$PY" -m launcher fetch org/big --quiet; echo "rc1=$?"
        ls -a "{blobs}" | sed 's/^/blob: /'
        "$PY" -c "import urllib.request as u; u.urlopen('$HF_ENDPOINT/between-runs')" 2>/dev/null
        mount -o remount,size=8m "$HF_HOME" || exit 98
        "$PY" -m launcher fetch org/big --quiet; echo "rc2=$?"
        """)
    env = {**os.environ, "PY": sys.executable, "HF_ENDPOINT": hub.url}
    return subprocess.run([shutil.which("unshare"), "-Urm", "sh", "-c", script], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=90, check=False)


@pytest.mark.parametrize("listing", ["true sizes", "understated sizes"])
def test_full_disk_is_one_clear_line_and_the_next_run_works(hub, tmp_path, listing):
    """With true sizes launch sees before downloading that 1 MB will not fit; with a listing that
    understates them (as when the disk fills up during the download) the write itself fails with
    ENOSPC. Either way: one line naming the cache and HF_HOME, no partial blob, next run fine."""
    hub.add_repo("org/big", tiny_repo_files(weights_kb=1024))
    hub.understate_sizes = listing == "understated sizes"
    done = _fetch_on_small_disk(tmp_path, hub, "256k")
    out = done.stdout.splitlines()
    assert "rc1=1" in out, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("launch: error:")]
    assert len(errors) == 1 and "not enough disk space for the Hugging Face cache at" in errors[0]
    assert str(hf_cache_dir()) in errors[0] and "HF_HOME" in errors[0]
    seen = hub.requests()
    first_run = seen[: [s.path for s in seen].index("/between-runs")]
    weights_asked = any(s.file == "model.safetensors" and s.method == "GET" for s in first_run)
    if listing == "true sizes":
        assert "needs 1.0 MB more" in errors[0] and not weights_asked  # refused before downloading
    else:
        assert weights_asked  # the write itself ran out of space
    assert not [line for line in out if line.startswith("blob: ") and line.endswith(".incomplete")]
    assert "rc2=0" in out, (done.stdout, done.stderr)


def test_nothing_waits_on_the_hub_when_launch_is_killed_outright(hub):
    """SIGKILL gives launch no chance to clean up: its connection to the hub still closes, because
    the download runs in launch's own process (there is no worker process to leave behind)."""
    import signal
    import time

    hub.stall(lambda method, path, file: "/resolve/" in path)
    launch = subprocess.Popen([sys.executable, "-m", "launcher", "fetch", "org/tiny", "-q"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while not hub.count(contains="/resolve/") and time.monotonic() < end:
            time.sleep(0.05)
        assert hub.count(contains="/resolve/"), "launch never reached the hub"
        launch.send_signal(signal.SIGKILL)
        launch.wait(timeout=10)
        end = time.monotonic() + 10
        while not hub.hangups and time.monotonic() < end:
            time.sleep(0.05)
        assert hub.hangups and "/resolve/" in hub.hangups[0]
    finally:
        if launch.poll() is None:
            launch.kill()


# --- refusals: no request, the Hugging Face cache unchanged -----------------------------------------


def cache_state(root: Path) -> dict[str, object]:
    """Every path under ``root`` with its bytes (or link target): equal states are byte-for-byte equal."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_file():
            state[rel] = path.read_bytes()
        else:
            state[rel] = "dir"
    return state


@pytest.mark.parametrize("argv, needle", [
    (["org/tiny", "--revision", ""], "--revision ''"),
    (["org/tiny", "--revision", "two words"], "--revision 'two words'"),
    (["org/tiny", "--timeout", "soon"], "--timeout 'soon'"),
    (["org/tiny", "--timeout", "0"], "--timeout '0'"),
    (["org/..", ], "no preset"),
    (["a--b/c"], "no preset"),
])
def test_refused_fetch_makes_no_request_and_leaves_the_cache_as_it_was(hub, argv, needle):
    from tests.conftest import assert_one_line_error

    assert run_launch("fetch", "org/tiny", "-q").returncode == 0
    home = Path(os.environ["HF_HOME"])
    before = cache_state(home)
    hub.reset()
    refused = run_launch("fetch", *argv)
    assert_one_line_error(refused, needle)
    assert hub.count() == 0
    assert cache_state(home) == before


def test_hf_home_that_is_a_file_is_named_as_such(hub, tmp_path):
    from tests.conftest import assert_one_line_error

    not_a_dir = tmp_path / "hf-home"
    not_a_dir.write_text("a file\n")
    done = run_launch("fetch", "org/tiny", env={"HF_HOME": str(not_a_dir)})
    assert_one_line_error(done, f"HF_HOME is {not_a_dir}", "not a directory")
    assert hub.count() == 0 and not_a_dir.read_text() == "a file\n"


def test_read_only_cache_is_one_clear_line(hub, tmp_path):
    """A real EROFS: a read-only tmpfs over HF_HOME in a private mount namespace (as above)."""
    home = Path(os.environ["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not _namespaces_work(tmp_path):
        pytest.skip("needs unshare(1) with user and mount namespaces to mount a tmpfs")
    script = 'mount -t tmpfs -o ro,size=64k tmpfs "$HF_HOME" || exit 97\n"$PY" -m launcher fetch org/tiny --quiet'
    env = {**os.environ, "PY": sys.executable, "HF_ENDPOINT": hub.url}
    done = subprocess.run([shutil.which("unshare"), "-Urm", "sh", "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=90, check=False)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"launch: error: cannot write the Hugging Face cache at {hf_cache_dir()}")
    assert "HF_HOME" in done.stderr
