"""Fetch checkpoints from the Hugging Face Hub into its standard cache: only what serving needs
(chosen by launcher/selection.py), with deadlines, clear errors, and no request when the cache can answer.

huggingface_hub's public API does all of it: ``HfApi.model_info`` (with its ``timeout``) resolves a
branch; ``snapshot_download`` lists the files (and records ``refs/`` and the listing);
``hf_hub_download`` downloads; ``get_cached_repo_tree`` / ``try_to_load_from_cache`` read the
cache. launch never writes or deletes anything in the cache itself.

- huggingface_hub reads HF_ENDPOINT, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE once, at import:
  ``_Call.now`` reads them at each call and passes them on, so a call follows its environment.
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
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import checks
from .errors import (
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
    RepoNotFound,
    RevisionNotFound,
    human_bytes,
)
from .paths import DEFAULT_REVISION, hf_cache_dir, hf_home, is_commit_sha, is_repo_id, repo_folder
from .selection import Selection, read_weight_map, select_files, serving_files

CONFIG = "config.json"
WORKERS = 8  # files downloaded at once, as huggingface_hub's own default
_GRACE_S = 0.5  # the watch waits this much longer than the requests it watches
BODY_KNOB = "HF_HUB_DOWNLOAD_TIMEOUT (huggingface_hub's wait per read of a file, retried 5 times)"


# --- one call: its settings, the foreign errors it may meet, its threads ------------------------


def _existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


@dataclass(frozen=True)
class _Call:
    repo_id: str
    revision: str
    endpoint: str
    cache_dir: Path
    offline: bool
    timeout_s: float
    wait_s: float  # for one metadata request (HEAD, branch lookup): at most HF_HUB_ETAG_TIMEOUT
    doing: str
    commit: str | None = None  # the commit to fetch when the caller already resolved the revision

    @property
    def pinned(self) -> str | None:
        return self.commit or (self.revision if is_commit_sha(self.revision) else None)

    @property
    def storage(self) -> Path:
        return self.cache_dir / repo_folder(self.repo_id)

    def snapshot(self, sha: str) -> Path:
        return self.storage / "snapshots" / sha

    @classmethod
    def now(cls, repo_id: str, revision: str | None, timeout_s: float | str | None,
            commit: str | None = None) -> _Call:
        """The call's settings, every argument checked, the environment read now."""
        from huggingface_hub import constants

        if not is_repo_id(repo_id):
            raise BadRepoId(repo_id)
        revision = DEFAULT_REVISION if revision is None else checks.revision("--revision", revision)
        seconds = checks.hub_timeout(timeout_s)
        offline = constants.is_offline_mode() or any((os.environ.get(v) or "").strip().upper() in
                                                     constants.ENV_VARS_TRUE_VALUES
                                                     for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).strip().rstrip("/")
        cache = hf_cache_dir()
        if not _existing(cache).is_dir():  # HF_HOME / HF_HUB_CACHE, or a folder above, is a file
            var, value = ("HF_HUB_CACHE", cache) if os.environ.get("HF_HUB_CACHE") else ("HF_HOME", hf_home())
            raise CacheNotADirectory(var, str(value), str(_existing(cache)))
        return cls(repo_id, revision, endpoint, cache, offline, seconds,
                   min(float(constants.HF_HUB_ETAG_TIMEOUT), seconds), f"downloading {repo_id}@{revision}",
                   commit if is_commit_sha(commit) else None)


def _reason(exc: BaseException) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", (str(exc).strip() or type(exc).__name__).splitlines()[0])
    return text[:1].lower() + text[1:]


def _translate(exc: BaseException, call: _Call) -> LaunchError:
    """The one table of foreign exceptions (huggingface_hub, its HTTP client, the OS): the first row
    whose type matches builds the LaunchError."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub import errors as hf

    c = call
    cause = exc.__cause__ or exc.__context__
    timed_out = isinstance(cause, httpx2.TimeoutException)
    unreachable = (lambda reason: HubUnreachable(c.repo_id, c.revision, c.endpoint, reason, str(c.cache_dir)))
    status = getattr(getattr(exc, "response", None), "status_code", None)
    url = str(getattr(getattr(exc, "response", None), "url", "") or "")
    failed = (lambda: HubError(c.repo_id, c.endpoint, f"{type(exc).__name__}: {_reason(exc)}"))
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
        (OSError, lambda: _os_error(exc, c) or failed()),
    ]
    for kind, build in table:
        if isinstance(exc, kind):
            return build()
    return failed()


def _os_error(exc: OSError, call: _Call) -> LaunchError | None:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFull(str(call.cache_dir), None, shutil.disk_usage(_existing(call.cache_dir)).free)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheNotWritable(str(call.cache_dir), exc.strerror or str(exc))
    return None


def _watched(call: _Call, tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run ``tasks`` (huggingface_hub calls), ``WORKERS`` at a time, in daemon threads; return their
    results. HubTimeout when none ends and the cache's blobs do not grow for ``call.timeout_s``.
    After a failure no new task starts; those under way end first (huggingface_hub then removes
    their partial files itself), then the first failure is raised."""
    results: list[Any] = [None] * len(tasks)
    failures: list[BaseException] = []  # the first one stops the rest
    ended: list[int] = []
    todo, lock = iter(range(len(tasks))), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = None if failures else next(todo, None)
            if i is None:
                return
            try:
                results[i] = tasks[i]()
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                failures.append(exc)
            ended.append(i)

    threads = [threading.Thread(target=worker, name="launch-hub", daemon=True)
               for _ in range(min(WORKERS, len(tasks)))]
    for thread in threads:
        thread.start()
    seen, last = None, time.monotonic()
    while alive := [t for t in threads if t.is_alive()]:
        alive[0].join(0.2)
        if (progress := (len(ended), _blob_sizes(call.storage))) != seen:
            seen, last = progress, time.monotonic()
        elif time.monotonic() - last > call.timeout_s + _GRACE_S:
            with lock:
                failures.append(HubTimeout(call.endpoint, call.timeout_s, call.doing))
            break
    if failures:
        raise failures[0]
    return results


@contextmanager
def _hf_output(*, warnings: bool, bars: bool) -> Iterator[None]:
    """huggingface_hub's warnings and progress bars on or off for the time of a call."""
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    try:
        if not warnings:
            hf_logging.set_verbosity_error()
        with nullcontext() if bars else disable_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(level)


# --- the cache (read only) --------------------------------------------------------------------


def _cached_tree(call: _Call, sha: str) -> dict[str, Any] | None:
    """``{path: RepoFile}`` at ``sha`` as huggingface_hub listed it into the cache, or None. A
    RepoFile's ``blob_id`` (git blob sha1) names a plain file's blob, not an LFS file's."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path: f for f in get_cached_repo_tree(call.repo_id, revision=sha, cache_dir=call.cache_dir)}
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _cached_sha(call: _Call) -> str | None:
    """The commit ``call.revision`` (a branch or tag) points at in the cache (huggingface_hub's refs), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(call.repo_id, CONFIG, cache_dir=call.cache_dir, revision=call.revision)
    return Path(found).parent.name if isinstance(found, str) else None


def _blob_sizes(storage: Path) -> dict[str, int]:
    try:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(storage / "blobs")}
    except OSError:
        return {}


def _in_cache(call: _Call, sha: str, trust_remote_code: bool) -> tuple[Selection, tuple[str, ...], bool]:
    """What the cache holds of ``sha`` by launch's selection rules, without the network: the
    selection, the files of it missing, and whether huggingface_hub's listing was there to choose
    from (else the snapshot's own files are taken, and at least config + weights are required)."""
    snapshot = call.snapshot(sha)
    tree = _cached_tree(call, sha)
    if tree is not None:
        paths = list(tree)
        selection = serving_files(paths, call.repo_id, call.revision, trust_remote_code=trust_remote_code)
    else:
        paths = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() or p.is_symlink())
        selection = select_files(paths, trust_remote_code=trust_remote_code)
    if selection.index and (weight_map := read_weight_map(snapshot / selection.index)):
        selection = select_files(paths, trust_remote_code=trust_remote_code, weight_map=weight_map)
    missing = [f for f in selection.files if not (snapshot / f).is_file()]
    if tree is None:  # what the repo has besides is not known: nothing is said skipped
        missing += [CONFIG] if CONFIG not in missing and not (snapshot / CONFIG).is_file() else []
        missing += ["model weights"] if selection.weights_format is None else []
        selection = replace(selection, skipped=())
    return selection, tuple(missing), tree is not None


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


def _result(call: _Call, snapshot: Path, selection: Selection | None, started: float,
            before: dict[str, int] | None = None, note: str | None = None) -> FetchResult:
    """``selection`` None: config.json alone. ``before``: the blobs before downloading (None: nothing was)."""
    files = selection.files if selection else (CONFIG,)
    size = sum((snapshot / f).stat().st_size for f in files if (snapshot / f).is_file())
    new = 0 if before is None else sum(n for b, n in _blob_sizes(call.storage).items() if b not in before)
    return FetchResult(snapshot, call.repo_id, call.revision, snapshot.name, files, size, new,
                       time.monotonic() - started, new == 0, selection.weights_format if selection else None,
                       selection.skipped if selection else (), note)


# --- fetching ---------------------------------------------------------------------------------


def _commit(call: _Call) -> tuple[str, LaunchError | None]:
    """The commit to fetch, and why the hub is not to be used (None: it answered, or the commit is
    pinned). Offline, or when the hub fails (except for an unknown revision), the cache's ref
    answers; without one that failure (NotCached offline) is raised."""
    from huggingface_hub import HfApi

    if call.offline:
        failure: LaunchError = NotCached(call.repo_id, call.revision, str(call.cache_dir))
    elif call.pinned:
        return call.pinned, None
    else:
        try:  # a private/gated repo whose token lapsed, or an outage: the cache may do
            sha = HfApi(endpoint=call.endpoint).model_info(call.repo_id, revision=call.revision,
                                                           timeout=call.wait_s).sha
        except Exception as exc:
            failure = _translate(exc, replace(call, doing=f"resolving {call.repo_id}@{call.revision}"))
            if isinstance(failure, RevisionNotFound):
                raise failure from exc
        else:
            if not is_commit_sha(sha):
                raise HubError(call.repo_id, call.endpoint,
                               "its answer names no commit sha; is HF_ENDPOINT a hub?")
            return str(sha), None
    sha = call.pinned or _cached_sha(call)
    if sha is None:
        raise failure
    return sha, failure


def _why(failure: LaunchError) -> str:
    if isinstance(failure, NotCached):
        return failure.reason
    if isinstance(failure, HubUnreachable):
        return f"the hub at {failure.endpoint} cannot be reached ({failure.reason})"
    return f"the hub refused ({type(failure).__name__})"


def fetch(
    repo_id: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
    timeout_s: float | str | None = None,
    commit: str | None = None,
) -> FetchResult:
    """Make ``repo_id`` at ``revision`` (default main) available in the Hugging Face cache and
    return where (``read_config`` reads config.json alone, writing nothing). ``quiet`` turns
    off huggingface_hub's progress bars (shown only when stderr is a terminal) and its warnings.
    ``timeout_s`` (default ``$LAUNCH_HUB_TIMEOUT``, else 600): see ``_watched``. ``commit``: the
    commit ``revision`` was resolved to when the plan was made; its files are the ones fetched.

    Requests: none when the revision is a commit sha complete in the cache, or with
    HF_HUB_OFFLINE=1; one for a branch or tag already complete in the cache. An unreachable hub
    falls back to a complete cache; a partial one is IncompleteCache.
    """
    started = time.monotonic()
    call = _Call.now(repo_id, revision, timeout_s, commit)
    try:
        with _hf_output(warnings=not quiet, bars=not quiet and sys.stderr.isatty()):
            sha, failure = _commit(call)
            snapshot = call.snapshot(sha)
            selection, missing, listed = _in_cache(call, sha, trust_remote_code)
            if not missing and (listed or failure):
                return _result(call, snapshot, selection, started, note=failure and _why(failure))
            if failure is None:
                return _download(call, trust_remote_code, started)
            if not isinstance(failure, (NotCached, HubUnreachable)) or not snapshot.is_dir():
                raise failure
            raise IncompleteCache(call.repo_id, call.revision, str(snapshot), missing, _why(failure))
    except LaunchError:
        raise
    except Exception as exc:
        raise _translate(exc, call) from exc


def _download(call: _Call, trust_remote_code: bool, started: float) -> FetchResult:
    from huggingface_hub import hf_hub_download, snapshot_download

    common = {"cache_dir": call.cache_dir, "endpoint": call.endpoint, "etag_timeout": call.wait_s}
    existing = _existing(call.storage)
    if not os.access(existing, os.W_OK):  # huggingface_hub would list the files, then fail or warn
        raise CacheNotWritable(str(call.cache_dir), f"{existing} is read-only or not writable by this user")
    before = _blob_sizes(call.storage)

    def listing(revision: str) -> Path:  # no pattern matches: nothing is downloaded yet (and the
        with _hf_output(warnings=False, bars=False):  # "No files matched" warning is not the user's)
            return Path(_watched(call, [lambda: snapshot_download(call.repo_id, revision=revision,
                                                                  allow_patterns=[], **common)])[0])

    # The file list at the revision asked for, so that huggingface_hub records where it points
    # (refs/, for offline use later); at the planned commit instead if the branch moved or went since.
    try:
        path = listing(call.revision)
    except Exception as exc:
        if not call.commit or not isinstance(_translate(exc, call), RevisionNotFound):
            raise
        path = listing(call.commit)
    if call.commit and path.name != call.commit:
        path = listing(call.commit)
    tree = _cached_tree(call, path.name)
    if tree is None:
        raise HubError(call.repo_id, call.endpoint, "huggingface_hub kept no file list for it")
    selection = serving_files(tree, call.repo_id, call.revision, trust_remote_code=trust_remote_code)

    def get(names: Iterable[str]) -> None:
        blobs = call.storage / "blobs"  # an LFS blob cached for another commit counts: an over-estimate
        needed = sum(tree[f].size for f in names if f in tree and not (blobs / tree[f].blob_id).exists())
        if needed > (free := shutil.disk_usage(_existing(call.cache_dir)).free):
            raise DiskFull(str(call.cache_dir), needed, free)
        _watched(call, [lambda name=name: hf_hub_download(call.repo_id, name, revision=path.name, **common)
                        for name in names])

    if selection.index is not None:  # the index names the shards: fetch it (and the small files) first
        get(selection.meta)
        weight_map = read_weight_map(path / selection.index)
        if weight_map is None:
            raise HubError(call.repo_id, call.endpoint, f"its {selection.index} has no weight_map")
        selection = select_files(tree, trust_remote_code=trust_remote_code, weight_map=weight_map)
        absent = [w for w in selection.weights if w not in tree]
        if absent:
            raise HubFileMissing(call.repo_id, call.revision, f"{absent[0]} (named in {selection.index})")
    get(selection.files)
    return _result(call, path, selection, started, before)


def read_config(repo_id: str, *, revision: str | None = None,
                timeout_s: float | str | None = None) -> tuple[bytes, str]:
    """``(config.json bytes, commit sha)`` of ``repo_id`` at ``revision``, for checks that may still
    refuse the command: nothing is written that stays, the Hugging Face cache included. Read from
    the cache when it holds that commit's config (no request for a pinned sha or offline, one for a
    branch), else downloaded by huggingface_hub into a temporary directory removed afterwards."""
    import tempfile

    from huggingface_hub import hf_hub_download

    call = _Call.now(repo_id, revision, timeout_s)
    call = replace(call, doing=f"reading {repo_id}@{call.revision} config.json")
    try:
        sha, failure = _commit(call)
        if (cached := call.snapshot(sha) / CONFIG).is_file():
            return cached.read_bytes(), sha
        if failure is not None:
            raise failure
        with tempfile.TemporaryDirectory(prefix="launch-config-") as tmp:
            got = _watched(call, [lambda: hf_hub_download(repo_id, CONFIG, revision=sha, local_dir=tmp,
                                                          endpoint=call.endpoint, etag_timeout=call.wait_s)])
            return Path(got[0]).read_bytes(), sha
    except LaunchError:
        raise
    except Exception as exc:
        raise _translate(exc, call) from exc


__all__ = ["FetchResult", "fetch", "read_config"]
