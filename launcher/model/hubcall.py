"""One call to the Hugging Face Hub through huggingface_hub: its settings, checked before huggingface_hub
is imported (``Call``); the one table of the foreign exceptions it may meet (``translate``); and the
daemon threads that hold it to its deadlines (``watched``).

Deadlines: httpx's timeouts are per read (a hub that trickles its answer never trips them) and the
file listing takes none, so every hub call runs in a daemon thread watched by ``watched``: the
metadata (branch, file list, config.json) must be complete within ``timeout_s`` of the start, all
together, and a download must make progress (a file ends, a blob grows) every ``timeout_s``. Daemon
threads do not hold the exit: a command that gave up ends at once (snapshot_download's own pool joins
its threads at exit, so a stalled hub held ``launch fetch --timeout 2`` past 60 s).
"""

from __future__ import annotations

import errno
import functools
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from launcher.errors import LaunchError
from launcher.model import hubenv
from launcher.model.hubcache import blob_sizes, human_bytes
from launcher.model.selection import HubFileMissing
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


@dataclass(frozen=True)
class Call:
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
            commit: str | None = None) -> Call:
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


def redacted(func: Callable[..., T]) -> Callable[..., T]:
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


def translate(exc: BaseException, call: Call) -> LaunchError:
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


def _os_error(exc: OSError, call: Call) -> LaunchError | None:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFull(str(call.cache_dir), None, shutil.disk_usage(hubenv.existing(call.cache_dir)).free)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheNotWritable(str(call.cache_dir), exc.strerror or str(exc))
    return None


def watched(call: Call, tasks: list[Callable[[], Any]], *, metadata: bool = False) -> list[Any]:
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
def hf_output(*, warnings: bool, bars: bool) -> Iterator[None]:
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
