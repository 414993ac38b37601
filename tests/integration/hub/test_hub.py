"""launch fetch / launcher.model.hub against a real HTTP fake of the Hugging Face Hub on 127.0.0.1
(tests/support/fakehub.py). huggingface_hub itself is never mocked: the real client talks to the server,
which counts what it is asked."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from launcher.model.hub import IncompleteCache, fetch, read_config
from launcher.model.hubcache import NotCached
from launcher.model.hubcall import (
    BadRepoId,
    GatedRepo,
    HubTimeout,
    HubUnreachable,
    RepoNotFound,
    RevisionNotFound,
)
from launcher.model.selection import NoWeights
from launcher.rules.checks import BadOption, hub_timeout
from launcher.runtime.paths import hf_cache_dir, is_repo_id, repo_folder
from tests.conftest import cache_mismatches
from tests.support.fakehub import TINY_CONFIG, FakeHub, safetensors_bytes, tiny_repo_files
from tests.unit.model.test_selection import SERVING_FILES, SKIPPED  # what fetch takes and leaves of org/tiny

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def storage(repo_id: str = "org/tiny") -> Path:
    return hf_cache_dir() / repo_folder(repo_id)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink()}


def requested_files(hub: FakeHub) -> set[str]:
    return {s.file for s in hub.requests() if s.file}


def incomplete_blobs(repo_id: str = "org/tiny") -> list[str]:
    blobs = storage(repo_id) / "blobs"
    return sorted(p.name for p in blobs.iterdir() if p.name.endswith(".incomplete")) if blobs.is_dir() else []


@pytest.mark.parametrize("text, expected", [
    ("org/tiny", True), ("internlm/internlm2_5-7b-chat", True), ("Qwen/Qwen2.5-7B-Instruct", True),
    ("tiny", False), ("./org/tiny", False), ("/abs/path", False), ("org/tiny/extra", False),
    ("org/ti--ny", False), ("org/tiny.", False), ("org/ti..ny", False), ("org/tiny.git", False),
    ("org/ tiny", False), ("~/models", False),
])
def test_is_repo_id(text, expected):
    assert is_repo_id(text) is expected


def test_bad_input_is_refused_before_any_request(hub):
    with pytest.raises(BadRepoId):
        fetch("not a repo")
    with pytest.raises(BadOption, match="--revision"):
        fetch("org/tiny", revision="two words")
    with pytest.raises(BadOption, match="--revision ''"):
        fetch("org/tiny", revision="")  # not read as "the default branch"
    with pytest.raises(BadOption, match="--timeout"):
        fetch("org/tiny", timeout_s="-1")
    assert hub.count() == 0


def test_timeout_comes_from_flag_then_env(monkeypatch):
    assert hub_timeout() == 600
    monkeypatch.setenv("LAUNCH_HUB_TIMEOUT", "42")
    assert hub_timeout() == 42 and hub_timeout("3") == 3
    with pytest.raises(BadOption, match="--timeout '1e305'"):
        hub_timeout("1e305")  # a range, not only a sign: a week at most
    monkeypatch.setenv("LAUNCH_HUB_TIMEOUT", "soon")
    with pytest.raises(BadOption, match="LAUNCH_HUB_TIMEOUT"):
        hub_timeout()


# --- downloading and the cache -------------------------------------------------------------------


def test_fetch_downloads_only_what_serving_needs(hub):
    source = tiny_repo_files()
    result = fetch("org/tiny")
    assert set(result.files) == SERVING_FILES and files_under(result.path) == SERVING_FILES
    assert set(result.skipped) == SKIPPED
    assert not requested_files(hub) & SKIPPED  # skipped files are never even asked for
    assert hub.count("GET", "/tree/") == 1  # decided from one tree listing
    assert result.commit_sha == hub.repos["org/tiny"].refs["main"]
    assert (storage() / "refs" / "main").read_text() == result.commit_sha
    assert result.path == storage() / "snapshots" / result.commit_sha
    assert (result.path / "model.safetensors").read_bytes() == source["model.safetensors"]
    assert json.loads(result.config_path.read_text()) == TINY_CONFIG
    assert not result.from_cache and result.downloaded_bytes > len(source["model.safetensors"])
    assert result.bytes == sum(len(source[f]) for f in SERVING_FILES)
    assert result.weights_format == "safetensors"


def test_trust_remote_code_adds_the_repo_code(hub):
    result = fetch("org/tiny", trust_remote_code=True)
    assert "modeling_tiny.py" in result.files and (result.path / "modeling_tiny.py").is_file()
    assert "pytorch_model.bin" not in requested_files(hub)


def test_cached_branch_costs_one_request_and_a_pinned_sha_none(hub):
    first = fetch("org/tiny")
    hub.reset()
    again = fetch("org/tiny")
    assert [(s.method, s.path) for s in hub.requests()] == [("GET", "/api/models/org/tiny/revision/main")]
    assert again.from_cache and again.downloaded_bytes == 0 and again.path == first.path
    hub.reset()
    pinned = fetch("org/tiny", revision=first.commit_sha)
    assert hub.count() == 0
    assert pinned.from_cache and pinned.commit_sha == first.commit_sha and set(pinned.files) == SERVING_FILES


def test_pinned_sha_downloads_without_resolving(hub):
    sha = hub.repos["org/tiny"].refs["main"]
    result = fetch("org/tiny", revision=sha)
    assert hub.count(contains="/revision/") == 0 and set(result.files) == SERVING_FILES
    assert not (storage() / "refs" / "main").exists()  # a sha is not a branch: no ref recorded


def test_following_a_branch_picks_up_a_new_commit_and_reuses_blobs(hub):
    first = fetch("org/tiny")
    files = tiny_repo_files()
    files["config.json"] = json.dumps({**TINY_CONFIG, "max_position_embeddings": 512}).encode()
    new_sha = hub.repos["org/tiny"].push(files)
    hub.reset()
    second = fetch("org/tiny")
    assert second.commit_sha == new_sha != first.commit_sha
    assert (storage() / "refs" / "main").read_text() == new_sha
    assert json.loads(second.config_path.read_text())["max_position_embeddings"] == 512
    assert hub.count("GET", "/cdn/") == 0  # the weights are the same blob: not downloaded again
    assert second.downloaded_bytes == len(files["config.json"])


def test_sharded_repo_takes_the_indexed_shards_only(hub):
    shard1, shard2 = safetensors_bytes({"a": (4, 4)}), safetensors_bytes({"b": (4, 4)}, fill=7)
    index = {"metadata": {"total_size": 128}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    hub.add_repo("org/sharded", {
        "config.json": json.dumps(TINY_CONFIG).encode(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": shard1,
        "model-00002-of-00002.safetensors": shard2,
        "consolidated.safetensors": shard1 + shard2,
        "pytorch_model.bin.index.json": b"{}",
    })
    result = fetch("org/sharded")
    assert set(result.files) == {"config.json", "model.safetensors.index.json",
                                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert not requested_files(hub) & {"consolidated.safetensors", "pytorch_model.bin.index.json"}
    assert fetch("org/sharded").from_cache  # the cache check reads the same index


def test_bin_only_repo_takes_bin_and_says_so(hub):
    hub.add_repo("org/old", {"config.json": json.dumps(TINY_CONFIG).encode(), "pytorch_model.bin": bytes(300),
                             "training_args.bin": bytes(10)})
    result = fetch("org/old")
    assert set(result.files) == {"config.json", "pytorch_model.bin"} and result.weights_format == "bin"
    assert ".bin weights" in result.summary()


def test_repo_without_weights_is_refused_before_downloading_them(hub):
    hub.add_repo("org/gguf", {"config.json": b"{}", "model.Q4_K_M.gguf": bytes(100)})
    with pytest.raises(NoWeights, match="model.Q4_K_M.gguf"):
        fetch("org/gguf")
    assert "model.Q4_K_M.gguf" not in requested_files(hub)


# --- offline and unreachable ----------------------------------------------------------------------


def test_offline_uses_a_complete_cache_with_no_request(hub, monkeypatch):
    first = fetch("org/tiny")
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = fetch("org/tiny")
    assert hub.count() == 0 and offline.path == first.path and offline.from_cache
    assert "HF_HUB_OFFLINE" in offline.summary()
    hub.add_repo("org/other", tiny_repo_files())
    with pytest.raises(NotCached, match="HF_HUB_OFFLINE"):
        fetch("org/other")
    assert hub.count() == 0


def test_stopped_hub_complete_cache_works_nothing_cached_is_clear(hub):
    first = fetch("org/tiny")
    hub.stop()
    again = fetch("org/tiny")
    assert again.path == first.path and again.from_cache and "cannot be reached" in again.summary()
    with pytest.raises(HubUnreachable, match="org/never"):
        fetch("org/never")


@pytest.mark.parametrize("how", ["stopped", "offline"])
def test_partial_cache_without_hub_is_a_clear_error(hub, monkeypatch, how):
    cache_config_alone(hub)  # the cache now holds config.json and nothing else
    if how == "stopped":
        hub.stop()
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IncompleteCache) as caught:
        fetch("org/tiny")
    message = str(caught.value)
    assert "launch fetch org/tiny" in message and ("cannot be reached" in message or "HF_HUB_OFFLINE" in message)


# --- errors -----------------------------------------------------------------------------------------


def test_repo_and_revision_not_found(hub):
    with pytest.raises(RepoNotFound, match="org/missing"):
        fetch("org/missing")
    with pytest.raises(RevisionNotFound, match="'nope'"):
        fetch("org/tiny", revision="nope")
    assert not storage("org/missing").exists() and not (storage() / "snapshots").exists()


def test_gated_repo_needs_the_licence_and_a_token(hub, monkeypatch):
    hub.add_repo("org/gated", tiny_repo_files(), gated=True)
    with pytest.raises(GatedRepo) as caught:
        fetch("org/gated")
    message = str(caught.value)
    assert f"{hub.url}/org/gated" in message and "accept the licence" in message and "HF_TOKEN" in message
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(GatedRepo, match="your token has no access"):
        fetch("org/gated")
    hub.tokens.add("hf_good")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    hub.reset()
    assert set(fetch("org/gated").files) == SERVING_FILES
    resolves = [s for s in hub.requests() if "/resolve/" in s.path]
    cdn = [s for s in hub.requests() if s.path.startswith("/cdn/")]
    assert resolves and all(s.authorization == "Bearer hf_good" for s in resolves)
    assert cdn and all(s.authorization is None for s in cdn)  # the token never leaves the hub host


# --- interruptions and deadlines --------------------------------------------------------------------


def test_dropped_connection_resumes_with_a_range_request(hub):
    chunk = 10 * 1024 * 1024  # huggingface_hub writes (and so resumes) in 10 MiB chunks
    files = tiny_repo_files(weights_kb=11 * 1024)
    weights = files["model.safetensors"]
    hub.add_repo("org/big", files)
    hub.drop_once("model.safetensors", after=chunk + 4096)
    result = fetch("org/big")
    assert hub.dropped == ["model.safetensors"]
    ranged = [s for s in hub.requests() if s.file == "model.safetensors" and s.range]
    assert [(s.range, s.status) for s in ranged] == [(f"bytes={chunk}-", 206)]
    assert (result.path / "model.safetensors").read_bytes() == weights
    assert cache_mismatches(hub.url, "org/big") == []


def _wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_hub_that_never_answers_the_revision_request_hits_the_deadline(hub):
    hub.stall()
    with pytest.raises(HubTimeout, match="resolving org/tiny@main"):
        fetch("org/tiny", timeout_s=1)
    assert _wait_for(lambda: hub.hangups)  # launch closed the connection: nothing still waits


def test_stalled_body_is_bounded_by_huggingface_hub_and_leaves_no_partial_file(hub, monkeypatch):
    """A body that stops mid-way is huggingface_hub's to bound (HF_HUB_DOWNLOAD_TIMEOUT per read,
    5 resumes); launch turns its failure into HubTimeout naming that setting. (This replaces the
    old test of launch killing its download worker: there is no worker any more.)"""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)  # what HF_HUB_DOWNLOAD_TIMEOUT=1 sets at import
    hub.stall_body("model.safetensors")  # headers and half the body, then silence, on every try
    seen_partial: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_partial.extend(incomplete_blobs())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        with pytest.raises(HubTimeout, match="downloading org/tiny@main.*HF_HUB_DOWNLOAD_TIMEOUT"):
            fetch("org/tiny", timeout_s=30)
    finally:
        stop.set()
        watcher.join()
    assert time.monotonic() - started < 25  # six tries of 1 s (+1 s pause each), not the 30 s deadline
    assert seen_partial, "huggingface_hub never started writing the blob"
    assert incomplete_blobs() == []  # huggingface_hub removed its partial file itself
    assert _wait_for(lambda: hub.hangups)  # no connection is left waiting
    hub._stall_body.clear()
    result = fetch("org/tiny")  # nothing left behind blocks the next run
    assert (result.path / "model.safetensors").read_bytes() == tiny_repo_files()["model.safetensors"]
    assert cache_mismatches(hub.url, "org/tiny") == []


# --- integrity ----------------------------------------------------------------------------------------


def test_cache_check_proves_blobs_match_their_etags_and_catches_edits(hub):
    from huggingface_hub import HfApi

    result = fetch("org/tiny")
    assert cache_mismatches(hub.url, "org/tiny") == []
    online = HfApi(endpoint=hub.url).verify_repo_checksums("org/tiny", cache_dir=hf_cache_dir())
    assert online.mismatches == [] and online.checked_count == len(SERVING_FILES)
    # The danger the overlay exists for: writing config.json in place goes through the symlink.
    (result.path / "config.json").write_text('{"edited": true}')
    mismatches = cache_mismatches(hub.url, "org/tiny")
    assert [m["path"] for m in mismatches] == ["config.json"] and mismatches[0]["algorithm"] == "git-sha1"
    os.remove(os.path.realpath(result.path / "model.safetensors"))  # a pruned blob: the link dangles
    assert [(m["path"], m["algorithm"]) for m in cache_mismatches(hub.url, "org/tiny")][-1] == \
        ("model.safetensors", "link")
    with pytest.raises(ValueError, match="not present in cache"):
        cache_mismatches(hub.url, "org/never")


def test_cache_pristine_after_fetch_patch_plan(hub, tmp_path):
    """Fetch, build the patched overlay, and every blob still hashes to its ETag. (The lead extends
    this with the `launch plan`/`launch patch` steps on the repo id.)"""
    overlay = pytest.importorskip("launcher.model.overlay")
    result = fetch("org/tiny")
    original = result.config_path.read_bytes()
    patched = {**TINY_CONFIG, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    built = overlay.build_overlay(result.path, patched, {"test": "pristine"}, tmp_path / "overlay")
    assert json.loads((built.path / "config.json").read_text())["rope_scaling"]["factor"] == 2.0
    assert result.config_path.read_bytes() == original
    assert cache_mismatches(hub.url, "org/tiny") == []
    assert hashlib.sha256((built.path / "model.safetensors").read_bytes()).hexdigest() == \
        os.path.basename(os.path.realpath(result.path / "model.safetensors"))


# --- huggingface_hub's public API only; a silent hub; refusals -----------------------------------


def test_launcher_imports_no_private_module_of_huggingface_hub():
    import ast

    root = Path(__file__).resolve().parents[3] / "launcher"
    offenders, hub_users = [], []
    for source in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "huggingface_hub":
                    hub_users.append(source.name)
                    if any(p.startswith("_") for p in parts[1:]):
                        offenders.append(f"{source.relative_to(root)}: {module}")
    assert "hub.py" in hub_users  # the scan does see huggingface_hub imports
    assert offenders == []


class SilentHub:
    """A real TCP server on 127.0.0.1 that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        """Stop accepting. The connections accepted stay open (parked until the test process ends): a
        client thread launch left waiting on one (it gave up on it, as a daemon) never wakes to retry,
        and huggingface_hub's retry would reset its HTTP client shared with the tests that follow."""
        self.sock.close()
        _PARKED.extend(self.accepted)


_PARKED: list = []


@pytest.fixture
def silent(monkeypatch):
    server = SilentHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


@pytest.mark.parametrize("revision", [None, "0" * 40], ids=["branch", "pinned sha"])
def test_a_hub_that_never_answers_ends_within_the_deadline(silent, revision):
    """A branch waits on the commit lookup (a request with a timeout); a pinned sha on the file
    listing, which huggingface_hub runs without one: launch's deadline bounds it."""
    started = time.monotonic()
    with pytest.raises(HubTimeout, match="org/tiny"):
        fetch("org/tiny", revision=revision, timeout_s=1)
    assert time.monotonic() - started < 1 + 20  # the hub never answers: ending is the point
    assert silent.accepted  # it really connected and waited


def test_launch_fetch_on_a_silent_hub_exits_within_the_deadline(silent):
    """The whole command ends: nothing left waiting on the hub keeps the process alive. Measured
    against the same command refused at once offline (its start-up and imports)."""
    from tests.conftest import run_launch

    started = time.monotonic()
    baseline = run_launch("fetch", "org/tiny", "--revision", "0" * 40, env={"HF_HUB_OFFLINE": "1"})
    startup = time.monotonic() - started
    assert baseline.returncode == 1 and "HF_HUB_OFFLINE" in baseline.stderr
    started = time.monotonic()
    done = run_launch("fetch", "org/tiny", "--revision", "0" * 40, "--timeout", "2", timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 1 and "gave no complete answer in 2 s" in done.stderr, done.stderr
    assert elapsed - startup < 2 + 20, (elapsed, startup)  # the hub never answers: ending is the point


# --- config.json alone, for checks that may refuse (nothing written) --------------------------------


def cache_files(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))} if root.exists() else {}


def test_read_config_writes_nothing_and_reads_the_cache_when_it_can(hub):

    home = Path(os.environ["HF_HOME"])
    sha = hub.repos["org/tiny"].refs["main"]
    text, commit = read_config("org/tiny")
    assert json.loads(text) == TINY_CONFIG and commit == sha
    assert cache_files(home) == {}  # nothing in the Hugging Face cache, not even refs/
    assert requested_files(hub) == {"config.json"}
    with pytest.raises(RepoNotFound):
        read_config("org/missing")
    cache_config_alone(hub)
    hub.reset()
    assert read_config("org/tiny", revision=sha) == (text, sha) and hub.count() == 0  # cached, pinned
    before = cache_files(home)
    assert read_config("org/tiny")[1] == sha and hub.count() == 1  # a branch: one request, no download
    assert cache_files(home) == before


def cache_config_alone(hub) -> None:
    """A partial cache, as huggingface_hub itself leaves it after fetching config.json alone."""
    from huggingface_hub import hf_hub_download

    hf_hub_download("org/tiny", "config.json", endpoint=hub.url,
                    cache_dir=Path(os.environ["HF_HOME"]) / "hub")
