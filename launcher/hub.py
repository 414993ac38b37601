"""Fetch checkpoints from the Hugging Face Hub into its standard cache: only what serving needs,
with deadlines, clear errors, and no request at all when the cache can answer.

huggingface_hub's public API does all of it: ``HfApi.model_info`` (with its ``timeout``) resolves a
branch; ``snapshot_download`` lists the files (and writes ``refs/`` and its per-commit listing);
``hf_hub_download`` downloads; ``get_cached_repo_tree`` / ``try_to_load_from_cache`` read the
cache. launch never writes or deletes anything in the cache itself.

- huggingface_hub reads HF_ENDPOINT, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE once, at import:
  ``_Call.now`` reads them at each fetch and passes them per call, so a call follows its environment.
- Deadlines: a stalled file body is bounded and resumed by huggingface_hub (HF_HUB_DOWNLOAD_TIMEOUT,
  per read); HEADs take ``etag_timeout``; the file listing takes no timeout. So every hub call runs
  in a daemon thread watched by ``_watched``: no progress for ``timeout_s`` is HubTimeout. Not in
  ``snapshot_download``'s own pool: its threads are joined at interpreter exit, and huggingface_hub
  retries a timed-out HEAD with 60 s timeouts, so a stalled hub held a finished ``launch fetch
  --timeout 2`` for over a minute (measured: tests/test_hub_cli.py::test_stalled_hub_ends_the_command).
  Daemon threads do not hold the exit, so no separate process is needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import (
    BadOption,
    BadRepoId,
    CacheNotADirectory,
    CacheNotWritable,
    DiskFull,
    GatedRepo,
    HubError,
    HubFileMissing,
    HubTimeout,
    HubUnreachable,
    IncompleteCache,
    LaunchError,
    NotCached,
    NoWeights,
    RepoNotFound,
    RevisionNotFound,
    human_bytes,
)
from .paths import hf_cache_dir, hf_home, is_commit_sha, is_repo_id, repo_folder

looks_like_repo_id = is_repo_id  # the one repo-id rule lives in launcher.paths

DEFAULT_REVISION = "main"
TIMEOUT_ENV = "LAUNCH_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
CONFIG = "config.json"
WORKERS = 8  # files downloaded at once, as huggingface_hub's own default
_GRACE_S = 0.5  # the watch waits this much longer than the requests it watches
BODY_KNOB = "HF_HUB_DOWNLOAD_TIMEOUT (huggingface_hub's wait per read of a file, retried 5 times)"

META_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")  # what serving reads besides weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx",
                   ".ot", ".tflite", ".pkl", ".npz")  # only safetensors (else .bin) are taken
NOT_WEIGHTS = frozenset({"training_args.bin"})


def hub_timeout(value: float | str | None = None) -> float:
    """The deadline in seconds: ``value`` (``--timeout``), else ``$LAUNCH_HUB_TIMEOUT``, else 600.
    BadOption for anything that is not a number of seconds > 0."""
    option = "--timeout"
    if value is None:
        value, option = os.environ.get(TIMEOUT_ENV), TIMEOUT_ENV
        if value is None or not str(value).strip():
            return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadOption(option, str(value), "give a number of seconds greater than 0, e.g. 600")
    return seconds


def check_revision(revision: str) -> str:
    """A branch, tag or commit sha as given to ``--revision``; ``''`` is refused (it is not main)."""
    if (not revision or any(c.isspace() for c in revision) or ".." in revision or "\\" in revision
            or revision.startswith("/") or revision.endswith("/")):
        raise BadOption("--revision", revision, "give a branch, tag or commit sha, e.g. main")
    return revision


# --- what to download (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The files of a repo that serving needs, decided from its file list."""

    files: tuple[str, ...]
    weights: tuple[str, ...]
    weights_format: str | None  # "safetensors", "bin", or None: no weights at the top level
    index: str | None  # the weight index; until it is read (weight_map None) weights are not known
    skipped: tuple[str, ...]

    @property
    def meta(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if f not in self.weights)


def select_files(paths: Iterable[str], *, trust_remote_code: bool = False,
                 weight_map: Mapping[str, str] | None = None) -> Selection:
    """Choose from a repo's file list. Top level only (``original/``, ``onnx/``... are other
    formats). Config/tokenizer/generation files (``*.json``, ``*.model``, ``*.tiktoken``,
    ``*.txt``, ``*.jinja``); ``*.py`` only with ``trust_remote_code``; safetensors weights, or
    ``.bin`` weights when there are no safetensors. With a weight index, the weights are exactly
    the files its ``weight_map`` names (so a ``consolidated.safetensors`` copy is skipped); pass the
    index's ``weight_map`` once it is read."""
    every = sorted(set(paths))
    top = [p for p in every if "/" not in p]
    safetensors = [p for p in top if p.endswith(".safetensors")]
    bins = [p for p in top if p.endswith(".bin") and p not in NOT_WEIGHTS]
    if safetensors:
        fmt, candidates, index_suffix = "safetensors", safetensors, ".safetensors.index.json"
    elif bins:
        fmt, candidates, index_suffix = "bin", bins, ".bin.index.json"
    else:
        fmt, candidates, index_suffix = None, [], None
    index = None
    if index_suffix:
        indexes = [p for p in top if p.endswith(index_suffix)]
        preferred = ("model" if fmt == "safetensors" else "pytorch_model") + index_suffix
        index = preferred if preferred in indexes else (indexes[0] if indexes else None)
    if index is None:
        weights = tuple(candidates)
    elif weight_map is None:
        weights = ()
    else:
        weights = tuple(sorted(set(weight_map.values())))
    meta = [p for p in top if p.endswith(META_SUFFIXES) and (not p.endswith(".index.json") or p == index)]
    code = [p for p in top if p.endswith(".py")] if trust_remote_code else []
    files = tuple(sorted(set(meta) | set(weights) | set(code)))
    skipped = tuple(p for p in every if p not in files)
    return Selection(files=files, weights=weights, weights_format=fmt, index=index, skipped=skipped)


def _read_weight_map(index_file: Path) -> dict[str, str] | None:
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in weight_map.items()} if isinstance(weight_map, dict) and weight_map else None


def _weight_like(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(p for p in sorted(paths) if p.endswith(WEIGHT_SUFFIXES))


# --- one call: its settings, the foreign errors it may meet, its threads ------------------------


@dataclass(frozen=True)
class _Call:
    repo_id: str
    revision: str
    endpoint: str
    cache_dir: Path
    offline: bool
    timeout_s: float
    wait_s: float  # for one metadata request (HEAD, branch lookup): at most HF_HUB_ETAG_TIMEOUT
    doing: str = ""

    @property
    def storage(self) -> Path:
        return self.cache_dir / repo_folder(self.repo_id)

    @classmethod
    def now(cls, repo_id: str, revision: str, timeout_s: float) -> _Call:
        from huggingface_hub import constants

        offline = constants.is_offline_mode() or any((os.environ.get(v) or "").strip().upper() in
                                                     {"1", "ON", "YES", "TRUE"}
                                                     for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).strip().rstrip("/")
        return cls(repo_id, revision, endpoint, _usable_cache_dir(), offline, timeout_s,
                   min(float(constants.HF_HUB_ETAG_TIMEOUT), timeout_s), f"downloading {repo_id}@{revision}")


def _usable_cache_dir() -> Path:
    """The hub cache; CacheNotADirectory when HF_HOME / HF_HUB_CACHE (or a folder above) is a file."""
    cache = hf_cache_dir()
    var = "HF_HUB_CACHE" if os.environ.get("HF_HUB_CACHE") else "HF_HOME"
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CacheNotADirectory(var, str(cache if var == "HF_HUB_CACHE" else hf_home()), str(existing))
    return cache


def _reason(exc: BaseException) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", (str(exc).strip() or type(exc).__name__).splitlines()[0])
    return text[:1].lower() + text[1:]


def _free_bytes(path: Path) -> int | None:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return shutil.disk_usage(existing).free if existing is not None else None


def _translate(exc: BaseException, call: _Call) -> LaunchError:
    """The one table of foreign exceptions (huggingface_hub, its HTTP client, the OS): the first row
    whose type matches builds the LaunchError."""
    if isinstance(exc, LaunchError):
        return exc
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub import errors as hf

    c = call
    cause = exc.__cause__ or exc.__context__
    timed_out = isinstance(cause, httpx2.TimeoutException)
    unreachable = (lambda reason: HubUnreachable(c.repo_id, c.revision, c.endpoint, reason, str(c.cache_dir)))
    status = getattr(getattr(exc, "response", None), "status_code", None)
    url = str(getattr(getattr(exc, "response", None), "url", "") or "")
    table: list[tuple[type | tuple[type, ...], Callable[[], LaunchError]]] = [
        (hf.GatedRepoError, lambda: GatedRepo(c.repo_id, f"{c.endpoint}/{c.repo_id}", bool(get_token()))),
        (hf.RepositoryNotFoundError, lambda: RepoNotFound(c.repo_id, c.endpoint)),
        (hf.RevisionNotFoundError, lambda: RevisionNotFound(c.repo_id, c.revision, c.endpoint)),
        (hf.RemoteEntryNotFoundError, lambda: HubFileMissing(
            c.repo_id, c.revision, url.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in url
            else "a file it lists")),
        (hf.HfHubHTTPError, lambda: RepoNotFound(c.repo_id, c.endpoint) if status == 401
            else HubError(c.repo_id, c.endpoint, f"HTTP {status}" if status else _reason(exc))),
        ((hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled), lambda: HubTimeout(c.endpoint, c.wait_s, c.doing)
            if timed_out else unreachable(_reason(cause) if cause is not None else "it cannot be reached")),
        (httpx2.TimeoutException, lambda: HubTimeout(c.endpoint, c.wait_s, c.doing) if c.doing.startswith(
            "resolving") else HubTimeout(c.endpoint, constants.HF_HUB_DOWNLOAD_TIMEOUT, c.doing, BODY_KNOB)),
        (httpx2.TransportError, lambda: unreachable(_reason(exc))),
        (OSError, lambda: _os_error(exc, c)),
    ]
    for kind, build in table:
        if isinstance(exc, kind):
            return build()
    return HubError(c.repo_id, c.endpoint, f"{type(exc).__name__}: {_reason(exc)}")


def _os_error(exc: OSError, call: _Call) -> LaunchError:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFull(str(call.cache_dir), None, _free_bytes(call.cache_dir))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheNotWritable(str(call.cache_dir), exc.strerror or str(exc))
    return HubError(call.repo_id, call.endpoint, f"{type(exc).__name__}: {_reason(exc)}")


def _watched(call: _Call, tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run ``tasks`` (huggingface_hub calls), ``WORKERS`` at a time, in daemon threads; return their
    results. HubTimeout when none ends and the cache's blobs do not grow for ``call.timeout_s``.
    After a failure no new task starts; those under way end first (huggingface_hub then removes
    their partial files itself), then the first failure is raised."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(tasks)):
        todo.put(i)
    done: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue()

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, tasks[i](), None))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                done.put((i, None, exc))

    for _ in range(min(WORKERS, len(tasks))):
        threading.Thread(target=worker, name="launch-hub", daemon=True).start()
    results: list[Any] = [None] * len(tasks)
    total, finished, failure = len(tasks), 0, None
    mark, last = _blob_sizes(call.storage), time.monotonic()
    while finished < total:
        try:
            i, value, exc = done.get(timeout=0.2)
            finished, last, results[i] = finished + 1, time.monotonic(), value
            if exc is not None and failure is None:
                failure = exc
                with todo.mutex:
                    total -= len(todo.queue)
                    todo.queue.clear()
        except queue.Empty:
            pass
        if (sizes := _blob_sizes(call.storage)) != mark:
            mark, last = sizes, time.monotonic()
        if time.monotonic() - last > call.timeout_s + _GRACE_S:
            with todo.mutex:
                todo.queue.clear()
            raise failure or HubTimeout(call.endpoint, call.timeout_s, call.doing)
    if failure is not None:
        raise failure
    return results


# --- the cache (read only) --------------------------------------------------------------------


def _cached_tree(call: _Call, sha: str) -> dict[str, tuple[int, str]] | None:
    """``{path: (size, git blob id)}`` at ``sha`` as huggingface_hub cached it, or None. The git blob
    id names a plain file's blob; an LFS file's blob is named by its sha256, not kept here."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        files = get_cached_repo_tree(call.repo_id, revision=sha, cache_dir=call.cache_dir)
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    return {f.path: (int(f.size), f.blob_id) for f in files}


def _cached_sha(call: _Call) -> str | None:
    """The commit ``call.revision`` points at in the cache (huggingface_hub's refs), or None."""
    from huggingface_hub import try_to_load_from_cache

    if is_commit_sha(call.revision):
        return call.revision
    found = try_to_load_from_cache(call.repo_id, CONFIG, cache_dir=call.cache_dir, revision=call.revision)
    return Path(found).parent.name if isinstance(found, str) else None


def _files_on_disk(snapshot: Path) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() or p.is_symlink())


def _blob_sizes(storage: Path) -> dict[str, int]:
    try:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(storage / "blobs")}
    except OSError:
        return {}


@dataclass(frozen=True)
class _Local:
    snapshot: Path
    files: tuple[str, ...]
    missing: tuple[str, ...]
    selection: Selection | None
    tree_known: bool


def _inspect(call: _Call, sha: str, *, trust_remote_code: bool, config_only: bool) -> _Local:
    """What the cache holds of ``sha`` and what it lacks, by launch's selection rules. No network."""
    snapshot = call.storage / "snapshots" / sha
    if config_only:
        return _Local(snapshot, (CONFIG,), () if (snapshot / CONFIG).is_file() else (CONFIG,), None, True)
    tree = _cached_tree(call, sha)
    paths = list(tree) if tree is not None else (_files_on_disk(snapshot) if snapshot.is_dir() else [])
    selection = (_check_selection(call, paths, trust_remote_code) if tree is not None
                 else select_files(paths, trust_remote_code=trust_remote_code))
    weight_map = _read_weight_map(snapshot / selection.index) if selection.index else None
    if weight_map is not None:
        selection = select_files(paths, trust_remote_code=trust_remote_code, weight_map=weight_map)
    missing = [f for f in selection.files if not (snapshot / f).is_file()]
    if tree is None:  # a snapshot huggingface_hub did not list: require at least config + weights
        missing += [CONFIG] if CONFIG not in missing and not (snapshot / CONFIG).is_file() else []
        missing += ["model weights"] if selection.weights_format is None else []
    return _Local(snapshot, selection.files, tuple(missing), selection, tree is not None)


def _check_selection(call: _Call, paths: Iterable[str], trust_remote_code: bool) -> Selection:
    paths = list(paths)
    if CONFIG not in paths:
        raise HubFileMissing(call.repo_id, call.revision, CONFIG)
    selection = select_files(paths, trust_remote_code=trust_remote_code)
    if selection.weights_format is None:
        raise NoWeights(call.repo_id, call.revision, _weight_like(paths))
    return selection


# --- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    path: Path  # the snapshot directory: <cache>/models--ORG--NAME/snapshots/<commit_sha>
    repo_id: str
    revision: str  # as requested (a branch, tag or sha); "main" when none was given
    commit_sha: str
    files: tuple[str, ...]  # repo-relative, all present under path
    bytes: int  # total size of files
    downloaded_bytes: int  # new bytes in the cache's blobs (0 when everything was cached)
    seconds: float
    from_cache: bool  # nothing was downloaded
    weights_format: str | None = None  # "safetensors", "bin" (no safetensors in the repo), None
    skipped: tuple[str, ...] = ()  # repo files left out (known when the file list was read)
    note: str | None = None  # why the hub was not asked, when it was not (offline, unreachable)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def summary(self) -> str:
        """One line for stderr: files, bytes, seconds, or "from cache"."""
        head = self.repo_id + ("" if self.revision == self.commit_sha else f"@{self.revision}")
        head += f" (commit {self.commit_sha[:12]})"
        if self.from_cache:
            tail = "from cache" + (f": {self.note}" if self.note else "")
        else:
            tail = f"downloaded {human_bytes(self.downloaded_bytes)} in {self.seconds:.1f} s"
        extra = "; the repo has no safetensors, so its .bin weights were taken" if self.weights_format == "bin" else ""
        return f"{head}: {len(self.files)} files, {human_bytes(self.bytes)}, {tail}{extra}"


def _result(local: _Local, call: _Call, sha: str, started: float, before: Mapping[str, int] | None,
            note: str | None = None) -> FetchResult:
    sel = local.selection
    size = sum((local.snapshot / f).stat().st_size for f in local.files if (local.snapshot / f).is_file())
    new = 0 if before is None else sum(n for b, n in _blob_sizes(call.storage).items() if b not in before)
    return FetchResult(local.snapshot, call.repo_id, call.revision, sha, local.files, size, new,
                       time.monotonic() - started, new == 0, sel.weights_format if sel else None,
                       sel.skipped if sel and local.tree_known else (), note)


# --- fetching ---------------------------------------------------------------------------------


def fetch(
    repo_id: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    config_only: bool = False,
    quiet: bool = False,
    timeout_s: float | str | None = None,
) -> FetchResult:
    """Make ``repo_id`` at ``revision`` (default main) available in the Hugging Face cache and
    return where. ``config_only`` fetches config.json alone (never the weights). ``quiet`` turns
    off huggingface_hub's progress bars (shown only when stderr is a terminal) and its warnings.
    ``timeout_s`` (default ``$LAUNCH_HUB_TIMEOUT``, else 600): see ``_watched``.

    Requests: none when the revision is a commit sha complete in the cache, or with
    HF_HUB_OFFLINE=1; one for a branch or tag already complete in the cache. An unreachable hub
    falls back to a complete cache; a partial one is IncompleteCache.
    """
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    started = time.monotonic()
    if not is_repo_id(repo_id):
        raise BadRepoId(repo_id)
    call = _Call.now(repo_id, DEFAULT_REVISION if revision is None else check_revision(revision),
                     hub_timeout(timeout_s))
    level = hf_logging.get_verbosity()
    try:
        if quiet:
            hf_logging.set_verbosity_error()
        with disable_progress_bars() if quiet or not sys.stderr.isatty() else nullcontext():
            return _fetch(call, trust_remote_code, config_only, started)
    except Exception as exc:
        raise _translate(exc, call) from exc
    finally:
        hf_logging.set_verbosity(level)


def _fetch(call: _Call, trust_remote_code: bool, config_only: bool, started: float) -> FetchResult:
    from huggingface_hub import HfApi

    sha = call.revision if is_commit_sha(call.revision) else None
    no_hub = "HF_HUB_OFFLINE is set" if call.offline else None  # why the hub is not asked
    failure: LaunchError | None = None  # what the hub said, when a complete cache may still do
    if sha is None and not call.offline:
        try:
            sha = HfApi(endpoint=call.endpoint).model_info(call.repo_id, revision=call.revision,
                                                           timeout=call.wait_s).sha
        except Exception as exc:  # a private/gated repo whose token lapsed, or an outage: the cache may do
            failure = _translate(exc, replace(call, doing=f"resolving {call.repo_id}@{call.revision}"))
            if isinstance(failure, RevisionNotFound):
                raise failure from exc
            no_hub = (f"the hub at {call.endpoint} cannot be reached ({failure.reason})"
                      if isinstance(failure, HubUnreachable) else f"the hub refused ({type(failure).__name__})")
        if failure is None and not is_commit_sha(sha):
            raise HubError(call.repo_id, call.endpoint, "its answer names no commit sha; is HF_ENDPOINT a hub?")
    if no_hub and (sha := sha or _cached_sha(call)) is None:
        raise failure or NotCached(call.repo_id, call.revision, str(call.cache_dir))
    assert sha is not None
    local = _inspect(call, sha, trust_remote_code=trust_remote_code, config_only=config_only)
    if not local.missing and (local.tree_known or no_hub):
        return _result(local, call, sha, started, None, no_hub)
    if no_hub:
        if failure is not None and not isinstance(failure, HubUnreachable) or not local.snapshot.is_dir():
            raise failure or NotCached(call.repo_id, call.revision, str(call.cache_dir))
        raise IncompleteCache(call.repo_id, call.revision, str(local.snapshot), local.missing, no_hub)
    return _download(call, trust_remote_code, config_only, started)


def _download(call: _Call, trust_remote_code: bool, config_only: bool, started: float) -> FetchResult:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    common = {"cache_dir": call.cache_dir, "endpoint": call.endpoint, "etag_timeout": call.wait_s}
    existing = next((p for p in (call.storage, *call.storage.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):  # huggingface_hub would list the files, then fail or warn
        raise CacheNotWritable(str(call.cache_dir), f"{existing} is read-only or not writable by this user")
    before = _blob_sizes(call.storage)
    if config_only:
        path = Path(_watched(call, [lambda: hf_hub_download(call.repo_id, CONFIG, revision=call.revision,
                                                              **common)])[0]).parent
        return _result(_Local(path, (CONFIG,), (), None, True), call, path.name, started, before)
    # The file list, at the commit the branch points at now: no pattern matches, so nothing is
    # downloaded yet (and its "No files matched" warning is not for the user).
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with disable_progress_bars():
            path = Path(_watched(call, [lambda: snapshot_download(call.repo_id, revision=call.revision,
                                                                  allow_patterns=[], **common)])[0])
    finally:
        hf_logging.set_verbosity(level)
    sha = path.name
    tree = _cached_tree(call, sha)
    if tree is None:
        raise HubError(call.repo_id, call.endpoint, "huggingface_hub kept no file list for it")
    selection = _check_selection(call, tree, trust_remote_code)

    def get(names: Iterable[str]) -> None:
        blobs = call.storage / "blobs"  # an LFS blob cached for another commit counts: an over-estimate
        needed = sum(tree[f][0] for f in names if f in tree and not (blobs / tree[f][1]).exists())
        if (free := _free_bytes(call.cache_dir)) is not None and needed > free:
            raise DiskFull(str(call.cache_dir), needed, free)
        _watched(call, [lambda name=name: hf_hub_download(call.repo_id, name, revision=sha, **common)
                        for name in names])

    if selection.index is not None:  # the index names the shards: fetch it (and the small files) first
        get(selection.meta)
        weight_map = _read_weight_map(path / selection.index)
        if weight_map is None:
            raise HubError(call.repo_id, call.endpoint, f"its {selection.index} has no weight_map")
        selection = select_files(tree, trust_remote_code=trust_remote_code, weight_map=weight_map)
        absent = [w for w in selection.weights if w not in tree]
        if absent:
            raise HubFileMissing(call.repo_id, call.revision, f"{absent[0]} (named in {selection.index})")
    get(selection.files)
    return _result(_Local(path, selection.files, (), selection, True), call, sha, started, before)


def read_config(repo_id: str, *, revision: str | None = None, timeout_s: float | str | None = None) -> tuple[bytes, str]:
    """``(config.json bytes, commit sha)`` of ``repo_id`` at ``revision``, for checks that may still
    refuse the command: nothing is written that stays, the Hugging Face cache included. Read from
    the cache when it holds that commit's config (no request for a pinned sha or offline, one for a
    branch), else downloaded by huggingface_hub into a temporary directory removed afterwards."""
    import tempfile

    from huggingface_hub import HfApi, hf_hub_download

    if not is_repo_id(repo_id):
        raise BadRepoId(repo_id)
    call = _Call.now(repo_id, DEFAULT_REVISION if revision is None else check_revision(revision),
                     hub_timeout(timeout_s))
    try:
        sha = _cached_sha(call) if call.offline else call.revision if is_commit_sha(call.revision) else (
            HfApi(endpoint=call.endpoint).model_info(repo_id, revision=call.revision, timeout=call.wait_s).sha)
        if sha is None or (call.offline and not (call.storage / "snapshots" / sha / CONFIG).is_file()):
            raise NotCached(repo_id, call.revision, str(call.cache_dir))
        cached = call.storage / "snapshots" / sha / CONFIG
        if cached.is_file():
            return cached.read_bytes(), sha
        with tempfile.TemporaryDirectory(prefix="launch-config-") as tmp:
            got = _watched(call, [lambda: hf_hub_download(repo_id, CONFIG, revision=sha, local_dir=tmp,
                                                          endpoint=call.endpoint, etag_timeout=call.wait_s)])[0]
            return Path(got).read_bytes(), sha
    except Exception as exc:
        raise _translate(exc, replace(call, doing=f"reading {repo_id}@{call.revision} config.json")) from exc


# --- integrity ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheMismatch:
    path: str  # repo-relative file of the snapshot
    expected: str
    actual: str
    algorithm: str  # "sha256", "git-sha1", or "link" (the file is missing or not the listed blob)


def verify_cache(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> list[CacheMismatch]:
    """Check a cached snapshot without the network: every file must be a blob whose content hashes
    to its name (the ETag: sha256 for LFS files, git blob sha1 otherwise), and a plain file the blob
    huggingface_hub's cached file list names. An empty list means pristine. (``HfApi().
    verify_repo_checksums`` does the same against the Hub, so it needs the network.)"""
    if not is_repo_id(repo_id):
        raise BadRepoId(repo_id)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hf_cache_dir()
    call = _Call(repo_id, check_revision(revision or DEFAULT_REVISION), "", cache, True, 1.0, 1.0)
    sha = _cached_sha(call)
    snapshot = call.storage / "snapshots" / (sha or "-")
    if sha is None or not snapshot.is_dir():
        raise NotCached(repo_id, call.revision, str(cache), "there is nothing to verify")
    tree, blobs = _cached_tree(call, sha) or {}, (call.storage / "blobs").resolve()
    mismatches: list[CacheMismatch] = []
    for rel in _files_on_disk(snapshot):
        real, listed = Path(os.path.realpath(snapshot / rel)), tree.get(rel, (0, None))[1]
        if not real.is_file():
            mismatches.append(CacheMismatch(rel, listed or "a file", "missing", "link"))
            continue
        if real.parent != blobs:
            continue  # a plain file huggingface_hub did not write: nothing to compare with
        if listed and len(real.name) == 40 and real.name != listed:
            mismatches.append(CacheMismatch(rel, listed, real.name, "link"))
        sha256 = len(real.name) == 64
        digest = hashlib.sha256() if sha256 else hashlib.sha1(b"blob %d\0" % real.stat().st_size)
        with open(real, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != real.name:
            mismatches.append(CacheMismatch(rel, real.name, digest.hexdigest(), "sha256" if sha256 else "git-sha1"))
    return mismatches


__all__ = ["CacheMismatch", "FetchResult", "Selection", "check_revision", "fetch", "hub_timeout", "is_commit_sha",
           "looks_like_repo_id", "read_config", "repo_folder", "select_files", "verify_cache"]
