"""Fetch checkpoints from the Hugging Face Hub into its standard cache: only what serving needs
(launcher/model/selection.py chooses), under deadlines, with clear errors and no request when the cache can answer.

All through huggingface_hub's public API: ``HfApi.model_info`` resolves a branch, ``snapshot_download``
lists the files (recording ``refs/`` and the listing), ``hf_hub_download`` downloads; launcher/model/hubcache.py
reads the cache offline. Settings are read and checked at each call by launcher/model/hubenv.py before
huggingface_hub is imported; every error leaving here has its secrets taken out (``hubenv.scrub``).

Deadlines: httpx's timeouts are per read (a hub that trickles its answer never trips them) and the
file listing takes none, so every hub call runs in a daemon thread watched by ``_watched``: the
metadata (branch, file list, config.json) must be complete within ``timeout_s`` of the start, all
together, and a download must make progress (a file ends, a blob grows) every ``timeout_s``. Daemon
threads do not hold the exit: a command that gave up ends at once.
"""

from __future__ import annotations

import errno
import functools
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
from typing import Any, TypeVar

from launcher.errors import LaunchError
from launcher.model import hubenv
from launcher.model.hubcache import (
    CONFIG,
    FetchResult,
    NotCached,
    blob_sizes,
    cached_config,
    cached_tree,
    human_bytes,
    in_cache,
)
from launcher.model.selection import HubFileMissing, Selection, read_weight_map, select_files, serving_files
from launcher.rules import checks
from launcher.runtime.paths import DEFAULT_REVISION, is_commit_sha, is_repo_id, repo_folder


class BadRepoId(LaunchError):
    value: str
    exit_code = 2
    message = ("{value!r} is not a Hugging Face repo id. Give ORG/NAME (e.g. internlm/internlm2_5-7b-chat) "
               "or a preset name (`launch presets`).")


class RepoNotFound(LaunchError):
    repo_id: str
    endpoint: str
    message = ("repository {repo_id} was not found on {endpoint}. Check the name; if it is private, set "
               "HF_TOKEN to a token that can read it.")


class RevisionNotFound(LaunchError):
    repo_id: str
    revision: str
    endpoint: str
    message = ("{repo_id} has no revision {revision!r} (branch, tag or commit) on {endpoint}. Check --revision "
               "or the preset's revision.")


class GatedRepo(LaunchError):
    """The repo needs its licence accepted on the model page, and a token of that account."""

    repo_id: str
    url: str
    has_token: bool

    def message(self) -> str:
        if self.has_token:
            return (f"{self.repo_id} is gated and your token has no access to it: accept the licence on the "
                    f"model page {self.url} with the account of that token, or set HF_TOKEN to a token of an "
                    "account that has.")
        return (f"{self.repo_id} is gated: accept the licence on the model page {self.url}, then set HF_TOKEN "
                "to a read token of that account (https://huggingface.co/settings/tokens).")


class HubUnreachable(LaunchError):
    """The hub cannot be used and the cache does not hold the revision at all."""

    repo_id: str
    revision: str
    endpoint: str
    reason: str
    cache_dir: str
    message = ("cannot reach the hub at {endpoint} ({reason}) and {repo_id}@{revision} is not in the cache at "
               "{cache_dir}. Check the network, proxy or HF_ENDPOINT, then run `launch fetch {repo_id}` again.")


class IncompleteCache(LaunchError):
    """The cache holds part of the revision and the hub cannot be used to complete it."""

    repo_id: str
    revision: str
    path: str
    missing: tuple[str, ...]
    reason: str

    def message(self) -> str:
        more = f" and {len(self.missing) - 3} more" if len(self.missing) > 3 else ""
        return (f"the cached copy of {self.repo_id}@{self.revision} at {self.path} lacks {len(self.missing)} "
                f"file(s) ({', '.join(self.missing[:3])}{more}) and {self.reason}. Run `launch fetch "
                f"{self.repo_id}` where the hub can be reached to complete it.")


class HubTimeout(LaunchError):
    endpoint: str
    seconds: float
    doing: str
    knob: str = "--timeout (or LAUNCH_HUB_TIMEOUT)"
    message = ("the hub at {endpoint} gave no complete answer in {seconds:g} s while {doing}, so launch gave up. "
               "Check the network or HF_ENDPOINT, or allow longer with {knob}.")


class HubError(LaunchError):
    """The hub answered with an error launch has no better words for; ``detail`` is what it said."""

    repo_id: str
    endpoint: str
    detail: str
    message = "the hub at {endpoint} failed for {repo_id}: {detail}. Try again later."


class DiskFull(LaunchError):
    cache_dir: str
    needed: int | None = None
    free: int | None = None

    def message(self) -> str:
        need = f": the download needs {human_bytes(self.needed)} more" if self.needed else ""
        free = f", {human_bytes(self.free)} is free" if self.free is not None else ""
        return (f"not enough disk space for the Hugging Face cache at {self.cache_dir}{need}{free}. Free some "
                "space, or move the cache with HF_HOME (or HF_HUB_CACHE) to a disk with room.")


class CacheNotWritable(LaunchError):
    cache_dir: str
    problem: str
    message = ("cannot write the Hugging Face cache at {cache_dir}: {problem}. Set HF_HOME (or HF_HUB_CACHE) to "
               "a writable directory.")


WORKERS = 8  # files downloaded at once, as huggingface_hub's own default
_GRACE_S = 0.5  # the watch waits this much longer than the requests it watches
BODY_KNOB = "HF_HUB_DOWNLOAD_TIMEOUT (huggingface_hub's wait per read of a file, retried 5 times)"
T = TypeVar("T")


# --- one call: its settings, the foreign errors it may meet, its threads ------------------------


@dataclass(frozen=True)
class _Call:
    repo_id: str
    revision: str
    hf: hubenv.HubSettings
    timeout_s: float
    wait_s: float  # for one metadata request (HEAD, branch lookup): at most HF_HUB_ETAG_TIMEOUT
    deadline: float  # time.monotonic() by which the metadata must be complete
    doing: str
    commit: str | None = None  # the commit to fetch when the caller already resolved the revision

    endpoint = property(lambda self: self.hf.endpoint)
    offline = property(lambda self: self.hf.offline)
    cache_dir = property(lambda self: self.hf.cache_dir)
    storage = property(lambda self: self.cache_dir / repo_folder(self.repo_id))

    @property
    def pinned(self) -> str | None:
        return self.commit or (self.revision if is_commit_sha(self.revision) else None)

    def snapshot(self, sha: str) -> Path:
        return self.storage / "snapshots" / sha

    @classmethod
    def now(cls, repo_id: str, revision: str | None, timeout_s: float | str | None,
            commit: str | None = None) -> _Call:
        """The call's settings, every argument and setting checked before huggingface_hub is imported."""
        if not is_repo_id(repo_id):
            raise BadRepoId(repo_id)
        revision = DEFAULT_REVISION if revision is None else checks.revision("--revision", revision)
        seconds = checks.hub_timeout(timeout_s)
        hf = hubenv.read()
        from huggingface_hub import constants
        from huggingface_hub.utils import logging as hf_logging  # (sets up the handler of its logger)

        hubenv.redact_logs(hf_logging.get_logger())  # it logs the URLs it retries
        if constants.is_offline_mode():  # huggingface_hub read HF_HUB_OFFLINE when it was imported
            hf = replace(hf, offline=True)
        wait = min(float(hf.etag_timeout or constants.DEFAULT_ETAG_TIMEOUT), seconds)
        return cls(repo_id, revision, hf, seconds, wait, time.monotonic() + seconds,
                   f"downloading {repo_id}@{revision}", commit if is_commit_sha(commit) else None)


def _redacted(func: Callable[..., T]) -> Callable[..., T]:
    """``func`` whose errors carry no secret; the original chain, redacted, is their cause (LAUNCH_DEBUG)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except LaunchError as err:
            raise hubenv.scrub(err) from hubenv.Redacted(err)

    return wrapper


def _reason(exc: BaseException) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", (str(exc).strip() or type(exc).__name__).splitlines()[0])
    return text[:1].lower() + text[1:]


def _translate(exc: BaseException, call: _Call) -> LaunchError:
    """The one table of foreign exceptions (huggingface_hub, its HTTP client, the OS): the first row
    whose type matches builds the LaunchError."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    c = call
    cause = exc.__cause__ or exc.__context__
    timed_out = isinstance(cause, httpx2.TimeoutException)
    unreachable = (lambda reason: HubUnreachable(c.repo_id, c.revision, c.endpoint, reason, str(c.cache_dir)))
    status = getattr(getattr(exc, "response", None), "status_code", None)
    url = str(getattr(getattr(exc, "response", None), "url", "") or "")
    failed = (lambda: HubError(c.repo_id, c.endpoint, f"{type(exc).__name__}: {_reason(exc)}"))
    table: list[tuple[type | tuple[type, ...], Callable[[], LaunchError]]] = [
        (hf.GatedRepoError, lambda: GatedRepo(c.repo_id, f"{c.endpoint}/{c.repo_id}", bool(c.hf.token))),
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
        return DiskFull(str(call.cache_dir), None, shutil.disk_usage(hubenv.existing(call.cache_dir)).free)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheNotWritable(str(call.cache_dir), exc.strerror or str(exc))
    return None


def _watched(call: _Call, tasks: list[Callable[[], Any]], *, metadata: bool = False) -> list[Any]:
    """Run ``tasks`` (huggingface_hub calls), ``WORKERS`` at a time, in daemon threads; return their
    results. HubTimeout past ``call.deadline`` for ``metadata``, else when none ends and the cache's
    blobs do not grow for ``call.timeout_s``. After a failure no new task starts; those under way
    end first (huggingface_hub then removes their partial files itself), then the first failure is raised."""
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
        if not metadata and (progress := (len(ended), blob_sizes(call.storage))) != seen:
            seen, last = progress, time.monotonic()
        elif time.monotonic() > (call.deadline if metadata else last + call.timeout_s) + _GRACE_S:
            with lock:
                failures.append(HubTimeout(call.endpoint, call.timeout_s, call.doing))
            _abandon(alive)
            break
    if failures:
        raise failures[0]
    return results


_ABANDONED = "launch-hub-abandoned"


def _drop_abandoned(record) -> bool:
    return record.threadName != _ABANDONED


def _abandon(threads: list[threading.Thread]) -> None:
    """Threads left behind past the deadline (daemons: they end with the process) say nothing more: what
    huggingface_hub logs in them ("Retrying in 2s") would follow launch's one-line error on stderr."""
    from huggingface_hub.utils import logging as hf_logging

    for thread in threads:
        thread.name = _ABANDONED
    for handler in hf_logging.get_logger().handlers:
        if _drop_abandoned not in handler.filters:
            handler.addFilter(_drop_abandoned)


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


def _result(call: _Call, snapshot: Path, selection: Selection, started: float,
            before: dict[str, int] | None = None, note: str | None = None) -> FetchResult:
    """``before``: the blobs before downloading (None: nothing was)."""
    size = sum((snapshot / f).stat().st_size for f in selection.files if (snapshot / f).is_file())
    new = 0 if before is None else sum(n for b, n in blob_sizes(call.storage).items() if b not in before)
    return FetchResult(snapshot, call.repo_id, call.revision, snapshot.name, selection.files, size, new,
                       time.monotonic() - started, new == 0, selection.weights_format, selection.skipped,
                       note)


# --- fetching ---------------------------------------------------------------------------------


def _commit(call: _Call) -> tuple[str, LaunchError | None]:
    """The commit to fetch, and why the hub is not to be used (None: it answered, or the commit is
    pinned). Offline, or when the hub fails (except for an unknown revision), the cache's ref
    answers; without one that failure (NotCached offline) is raised."""
    if call.offline:
        failure: LaunchError = NotCached(call.repo_id, call.revision, str(call.cache_dir))
    elif call.pinned:
        return call.pinned, None
    else:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=call.endpoint)
        resolving = replace(call, doing=f"resolving {call.repo_id}@{call.revision}")
        try:  # a private/gated repo whose token lapsed, or an outage: the cache may do
            sha = _watched(resolving, [lambda: api.model_info(call.repo_id, revision=call.revision,
                                                              timeout=call.wait_s).sha], metadata=True)[0]
        except Exception as exc:
            failure = exc if isinstance(exc, LaunchError) else _translate(exc, resolving)
            if isinstance(failure, RevisionNotFound):
                raise failure from exc
        else:
            if not is_commit_sha(sha):
                raise HubError(call.repo_id, call.endpoint,
                               "its answer names no commit sha; is HF_ENDPOINT a hub?")
            return str(sha), None
    found = None if call.pinned else cached_config(call.repo_id, call.revision, call.cache_dir)
    sha = call.pinned or (found.parent.name if found else None)
    if sha is None:
        raise failure
    return sha, failure


def _why(failure: LaunchError) -> str:
    if isinstance(failure, NotCached):
        return failure.reason
    if isinstance(failure, HubUnreachable):
        return hubenv.redact(f"the hub at {failure.endpoint} cannot be reached ({failure.reason})")
    if isinstance(failure, HubTimeout):
        return hubenv.redact(f"the hub at {failure.endpoint} did not answer within {failure.seconds:g} s")
    return f"the hub refused ({type(failure).__name__})"


@_redacted
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
            selection, missing, listed = in_cache(call.repo_id, call.revision, call.cache_dir, sha,
                                                  trust_remote_code)
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
    existing = hubenv.existing(call.storage)
    if not os.access(existing, os.W_OK):  # huggingface_hub would list the files, then fail or warn
        raise CacheNotWritable(str(call.cache_dir), f"{existing} is read-only or not writable by this user")
    before = blob_sizes(call.storage)

    def listing(revision: str) -> Path:  # no pattern matches: nothing is downloaded yet (and the
        with _hf_output(warnings=False, bars=False):  # "No files matched" warning is not the user's)
            task = (lambda: snapshot_download(call.repo_id, revision=revision, allow_patterns=[], **common))
            return Path(_watched(replace(call, doing=f"listing the files of {call.repo_id}@{revision}"), [task],
                                 metadata=True)[0])

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
    tree = cached_tree(call.repo_id, path.name, call.cache_dir)
    if tree is None:
        raise HubError(call.repo_id, call.endpoint, "huggingface_hub kept no file list for it")
    selection = serving_files(tree, call.repo_id, call.revision, trust_remote_code=trust_remote_code)

    def get(names: Iterable[str]) -> None:
        blobs = call.storage / "blobs"  # an LFS blob cached for another commit counts: an over-estimate
        needed = sum(tree[f].size for f in names if f in tree and not (blobs / tree[f].blob_id).exists())
        if needed > (free := shutil.disk_usage(hubenv.existing(call.cache_dir)).free):
            raise DiskFull(str(call.cache_dir), needed, free)
        _watched(call, [lambda name=name: hf_hub_download(call.repo_id, name, revision=path.name, **common)
                        for name in names])

    if selection.index is not None:  # the index names the shards: fetch it first
        get([selection.index])
        weight_map = read_weight_map(path / selection.index)
        if weight_map is None:
            raise HubError(call.repo_id, call.endpoint, f"its {selection.index} has no weight_map")
        selection = select_files(tree, trust_remote_code=trust_remote_code, weight_map=weight_map)
        absent = [w for w in selection.weights if w not in tree]
        if absent:
            raise HubFileMissing(call.repo_id, call.revision, f"{absent[0]} (named in {selection.index})")
    get(sorted(selection.files, key=lambda f: -tree[f].size if f in tree else 0))  # the biggest first
    return _result(call, path, selection, started, before)


@_redacted
def read_config(repo_id: str, *, revision: str | None = None,
                timeout_s: float | str | None = None) -> tuple[bytes, str]:
    """``(config.json bytes, commit sha)`` of ``repo_id`` at ``revision``, for checks that may still
    refuse the command: nothing is written that stays, the Hugging Face cache included. Read from
    the cache when it holds that commit's config (no request for a pinned sha or offline, one for a
    branch), else downloaded by huggingface_hub into a temporary directory removed afterwards."""
    import tempfile

    call = _Call.now(repo_id, revision, timeout_s)
    call = replace(call, doing=f"reading {repo_id}@{call.revision} config.json")
    from huggingface_hub import hf_hub_download

    try:
        sha, failure = _commit(call)
        if (cached := call.snapshot(sha) / CONFIG).is_file():
            return cached.read_bytes(), sha
        if failure is not None:
            raise failure
        with tempfile.TemporaryDirectory(prefix="launch-config-", ignore_cleanup_errors=True) as tmp:
            got = _watched(call, [lambda: hf_hub_download(repo_id, CONFIG, revision=sha, local_dir=tmp,
                                                          endpoint=call.endpoint, etag_timeout=call.wait_s)],
                           metadata=True)
            return Path(got[0]).read_bytes(), sha
    except LaunchError:
        raise
    except Exception as exc:
        raise _translate(exc, call) from exc


__all__ = ["FetchResult", "fetch", "read_config"]
