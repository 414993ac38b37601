"""Fetch checkpoints from the Hugging Face Hub into its standard cache: only what serving needs,
with deadlines, clear errors, and no request at all when the cache can answer.

Why it is built this way:

- huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and
  ``HF_TOKEN`` once, when it is imported. launch reads them at every call (``HubSettings.from_env``)
  and passes ``endpoint=``, ``cache_dir=``, ``token=`` explicitly, so a call follows the environment
  it runs in.
- What to download is decided from the repo's own file list (one tree listing, which
  huggingface_hub caches by commit): config, tokenizer and generation files, the safetensors
  weights named by their index, remote code only with trust_remote_code. ``.bin``/``.pth``/GGUF
  copies and ``original/`` folders are left out; ``.bin`` weights are taken only when a repo has
  no safetensors.
- Cache hits are free: a commit sha (pinned by a preset or ``--revision``) that is complete in the
  cache makes no request; a branch makes one, to learn its commit. Both run in this process.
- A hub that accepts a connection and never answers can hold huggingface_hub for many minutes (its
  repo-info and tree calls have no timeout, downloads retry). Everything that downloads runs in a
  worker process that launch kills when the hub has sent nothing for ``timeout_s``: a killed process
  really stops waiting, whereas a stuck thread cannot be stopped and would hold the interpreter at
  exit (huggingface_hub's download threads are joined at exit). The one request made in this
  process has its own timeout.
- The cache stays the Hugging Face cache: files are written only by huggingface_hub (blobs named
  by their ETag, snapshots of symlinks); launch writes only ``refs/<branch>`` after a download,
  and removes the partial files of a worker it had to kill. ``verify_cache`` checks every blob
  against its ETag without the network.
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
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from . import errors as _errors
from .errors import (
    BadOption,
    BadRepoId,
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
from .paths import cached_ref, hf_cache_dir, hf_home, is_commit_sha, repo_folder

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
TIMEOUT_ENV = "LAUNCH_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # huggingface_hub's own default for metadata requests
CONFIG = "config.json"

_POLL_S = 0.2
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"^{_NAME}/{_NAME}$")

# What serving reads from a repo's top level besides the weights.
META_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")
# Weight formats; only safetensors (else .bin) are taken.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx",
                   ".ot", ".tflite", ".pkl", ".npz")
NOT_WEIGHTS = frozenset({"training_args.bin"})


# --- names and settings -----------------------------------------------------------------------


def looks_like_repo_id(text: str) -> bool:
    """``ORG/NAME`` as the Hub spells repo ids. Purely syntactic: callers check local paths and
    preset names first (a relative path ``models/x`` looks like a repo id too)."""
    return (
        bool(_REPO_ID_RE.match(text))
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_timeout(value: float | str | None = None) -> float:
    """The stall deadline in seconds: ``value`` (``--timeout``), else ``$LAUNCH_HUB_TIMEOUT``, else
    600. BadOption for anything that is not a number of seconds > 0."""
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


@dataclass(frozen=True)
class HubSettings:
    """The Hub environment of one call, read when the call is made (not at import)."""

    endpoint: str
    cache_dir: Path
    offline: bool
    token: str | bool  # a token, or False: send none (never a stale login from import time)
    request_timeout: float

    @property
    def has_token(self) -> bool:
        return bool(self.token)

    @classmethod
    def from_env(cls) -> HubSettings:
        env = os.environ
        token: str | bool = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or ""
        if not token:
            token_file = Path(env.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()
            try:
                token = token_file.read_text(encoding="utf-8").strip()
            except OSError:
                token = ""
        try:
            request_timeout = float(env.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_REQUEST_TIMEOUT_S)
        except ValueError:
            request_timeout = DEFAULT_REQUEST_TIMEOUT_S
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/"),
            cache_dir=hf_cache_dir(),
            offline=_truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE")),
            token=token or False,
            request_timeout=request_timeout if request_timeout > 0 else DEFAULT_REQUEST_TIMEOUT_S,
        )


def _check_revision(revision: str) -> str:
    bad = (
        not revision
        or any(c.isspace() for c in revision)
        or ".." in revision
        or revision.startswith("/")
        or revision.endswith("/")
        or "\\" in revision
    )
    if bad:
        raise BadOption("--revision", revision, "give a branch, tag or commit sha, e.g. main")
    return revision


# --- what to download -------------------------------------------------------------------------


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


def select_files(
    paths: Iterable[str],
    *,
    trust_remote_code: bool = False,
    weight_map: Mapping[str, str] | None = None,
) -> Selection:
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
        preferred = "model" + index_suffix if fmt == "safetensors" else "pytorch_model" + index_suffix
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
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    return {str(k): str(v) for k, v in weight_map.items()}


def _exact(names: Iterable[str]) -> list[str]:
    """allow_patterns are fnmatch patterns: escape the characters that are special there."""
    return [re.sub(r"([*?\[])", r"[\1]", name) for name in names]


# --- the cache --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    size: int
    etag: str | None  # the blob name: sha256 for LFS files, git blob sha1 otherwise


def _cached_tree(storage: Path, sha: str, repo_id: str, cache_dir: Path) -> dict[str, _Entry] | None:
    """The repo's file list at ``sha`` as huggingface_hub cached it (``trees/<sha>.json``), or None.
    No network."""
    try:
        from huggingface_hub._tree_cache import read_tree_cache
    except ImportError:  # a future huggingface_hub: the public reader (without LFS hashes)
        try:
            from huggingface_hub import get_cached_repo_tree

            files = get_cached_repo_tree(repo_id, revision=sha, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - CachedRepoTreeNotFoundError or anything: "not cached"
            return None
        return {f.path: _Entry(int(f.size), None) for f in files}
    entries = read_tree_cache(str(storage), sha)
    if entries is None:
        return None
    return {path: _Entry(int(e.size), e.lfs_sha256 or e.blob_id) for path, e in entries.items()}


def _files_on_disk(snapshot: Path) -> list[str]:
    out = []
    for root, _dirs, names in os.walk(snapshot):
        for name in names:
            out.append(os.path.relpath(os.path.join(root, name), snapshot).replace(os.sep, "/"))
    return sorted(out)


def _write_ref(storage: Path, revision: str, sha: str) -> None:
    """Record ``revision -> sha`` the way huggingface_hub does (atomically; best effort)."""
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text(encoding="utf-8").strip() == sha:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(sha, encoding="utf-8")
        os.replace(tmp, ref)
    except OSError:
        pass


@dataclass(frozen=True)
class _Local:
    snapshot: Path
    files: tuple[str, ...]
    missing: tuple[str, ...]
    selection: Selection | None
    tree_known: bool


def _inspect_cache(repo_id: str, revision: str, sha: str, settings: HubSettings, *, trust_remote_code: bool,
                   config_only: bool) -> _Local:
    """What the cache holds of ``sha`` and what it lacks, by launch's selection rules. No network."""
    storage = settings.cache_dir / repo_folder(repo_id)
    snapshot = storage / "snapshots" / sha
    if config_only:
        missing = () if (snapshot / CONFIG).is_file() else (CONFIG,)
        return _Local(snapshot, (CONFIG,), missing, None, True)
    tree = _cached_tree(storage, sha, repo_id, settings.cache_dir)
    paths = list(tree) if tree is not None else _files_on_disk(snapshot)
    selection = select_files(paths, trust_remote_code=trust_remote_code)
    if tree is not None:
        if CONFIG not in tree:
            raise HubFileMissing(repo_id, revision, CONFIG)
        if selection.weights_format is None:
            raise NoWeights(repo_id, revision, _weight_like(paths))
    if selection.index is not None and (snapshot / selection.index).is_file():
        weight_map = _read_weight_map(snapshot / selection.index)
        if weight_map is not None:
            selection = select_files(paths, trust_remote_code=trust_remote_code, weight_map=weight_map)
    missing = [f for f in selection.files if not (snapshot / f).is_file()]
    if tree is None:  # a snapshot huggingface_hub did not list: require at least config + weights
        if CONFIG not in missing and not (snapshot / CONFIG).is_file():
            missing.append(CONFIG)
        if selection.weights_format is None:
            missing.append("model weights")
    return _Local(snapshot, selection.files, tuple(missing), selection, tree is not None)


def _weight_like(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(p for p in sorted(paths) if p.endswith(WEIGHT_SUFFIXES))


def _size_of(snapshot: Path, files: Iterable[str]) -> int:
    total = 0
    for name in files:
        try:
            total += (snapshot / name).stat().st_size
        except OSError:
            pass
    return total


def _blob_sizes(storage: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    try:
        entries = list(os.scandir(storage / "blobs"))
    except OSError:
        return sizes
    for entry in entries:
        try:
            sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
    return sizes


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _remove_abandoned_partials(storage: Path, cache_dir: Path, before: Iterable[str]) -> None:
    """Remove the ``*.incomplete`` files a killed worker left in ``blobs/``: only new ones, and only
    when no other process holds the blob's download lock (a concurrent download keeps its file)."""
    known = set(before)
    locks = cache_dir / ".locks" / storage.name
    for name in _blob_sizes(storage):
        if not name.endswith(".incomplete") or name in known:
            continue
        if _nobody_holds(locks / f"{name.split('.', 1)[0]}.lock"):
            try:
                os.unlink(storage / "blobs" / name)
            except OSError:
                pass


def _nobody_holds(lock: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock here: leave the file, it never blocks a later download
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# --- errors from huggingface_hub and the network -------------------------------------------------


@dataclass(frozen=True)
class _Context:
    repo_id: str
    revision: str
    endpoint: str
    cache_dir: Path
    has_token: bool


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    return text[:1].lower() + text[1:] if text else type(exc).__name__


def _hub_error(exc: BaseException, ctx: _Context, needed: int | None = None) -> LaunchError:
    """One LaunchError for whatever huggingface_hub, httpx2 or the OS raised."""
    if isinstance(exc, LaunchError):
        return exc
    from huggingface_hub import errors as hfe

    if isinstance(exc, hfe.GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return GatedRepo(ctx.repo_id, f"{ctx.endpoint}/{ctx.repo_id}", ctx.has_token)
    if isinstance(exc, hfe.RepositoryNotFoundError):
        return RepoNotFound(ctx.repo_id, ctx.endpoint)
    if isinstance(exc, hfe.RevisionNotFoundError):
        return RevisionNotFound(ctx.repo_id, ctx.revision, ctx.endpoint)
    if isinstance(exc, hfe.RemoteEntryNotFoundError):
        url = str(getattr(getattr(exc, "response", None), "url", "") or "")
        name = url.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in url else "a file it lists"
        return HubFileMissing(ctx.repo_id, ctx.revision, name)
    if isinstance(exc, hfe.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return RepoNotFound(ctx.repo_id, ctx.endpoint)
        return HubError(ctx.repo_id, ctx.endpoint, f"HTTP {status}" if status else _short_reason(exc))
    if isinstance(exc, (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled)):
        cause = exc.__cause__ or exc.__context__
        reason = _short_reason(cause) if cause is not None else "it cannot be reached"
        return HubUnreachable(ctx.repo_id, ctx.revision, ctx.endpoint, reason, str(ctx.cache_dir))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = _free_bytes(ctx.cache_dir)
        # The listing's sizes said it would fit; say how much is needed only when that still adds up.
        plausible = needed is not None and (free is None or needed > free)
        return DiskFull(str(ctx.cache_dir), needed if plausible else None, free)
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheNotWritable(str(ctx.cache_dir), exc.strerror or str(exc))
    try:
        import httpx2
    except ImportError:  # pragma: no cover - huggingface_hub 2.x always has it
        httpx2 = None
    if httpx2 is not None and isinstance(exc, httpx2.TransportError):
        return HubUnreachable(ctx.repo_id, ctx.revision, ctx.endpoint, _short_reason(exc), str(ctx.cache_dir))
    return HubError(ctx.repo_id, ctx.endpoint, f"{type(exc).__name__}: {_short_reason(exc)}")


class _Unreachable(Exception):
    def __init__(self, reason: str, stalled: bool, seconds: float) -> None:
        super().__init__(reason)
        self.reason, self.stalled, self.seconds = reason, stalled, seconds


def _resolve_commit(ctx: _Context, settings: HubSettings, timeout: float) -> str:
    """The commit a branch or tag points at: ONE request with its own timeout. Made with a fresh
    client rather than huggingface_hub's shared session, whose offline switch was fixed at import."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = f"{settings.endpoint}/api/models/{ctx.repo_id}/revision/{quote(ctx.revision, safe='')}"
    try:
        with httpx2.Client(timeout=timeout, follow_redirects=True) as client:
            response = client.get(url, headers=build_hf_headers(token=settings.token))
    except httpx2.TimeoutException:
        raise _Unreachable(f"no answer within {timeout:g} s", True, timeout) from None
    except httpx2.TransportError as exc:
        raise _Unreachable(_short_reason(exc), False, timeout) from None
    try:
        hf_raise_for_status(response)
        sha = response.json().get("sha")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one LaunchError line
        raise _hub_error(exc, ctx) from None
    if not is_commit_sha(sha):
        raise HubError(ctx.repo_id, settings.endpoint, "its answer names no commit sha; is HF_ENDPOINT a hub?")
    return sha


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


# --- fetching -----------------------------------------------------------------------------------


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
    ``timeout_s`` (default ``$LAUNCH_HUB_TIMEOUT``, else 600): give up when the hub has sent nothing
    for that long; a download that keeps receiving data is never cut off.

    Requests: none when the revision is a commit sha complete in the cache, or with
    HF_HUB_OFFLINE=1; one for a branch or tag already complete in the cache. An unreachable hub
    falls back to a complete cache; a partial one is IncompleteCache.
    """
    started = time.monotonic()
    if not looks_like_repo_id(repo_id):
        raise BadRepoId(repo_id)
    rev = _check_revision(revision or DEFAULT_REVISION)
    deadline = hub_timeout(timeout_s)
    settings = HubSettings.from_env()
    ctx = _Context(repo_id, rev, settings.endpoint, settings.cache_dir, settings.has_token)
    storage = settings.cache_dir / repo_folder(repo_id)

    no_hub: str | None = None  # why the hub will not be asked
    hub_failure: LaunchError | None = None  # what the hub said, when a complete cache may still do
    if is_commit_sha(rev):
        sha: str | None = rev
        if settings.offline:
            no_hub = "HF_HUB_OFFLINE is set"
    elif settings.offline:
        no_hub = "HF_HUB_OFFLINE is set"
        sha = cached_ref(storage, rev)
    else:
        try:
            sha = _resolve_commit(ctx, settings, min(settings.request_timeout, deadline))
        except _Unreachable as exc:
            sha = cached_ref(storage, rev)
            if sha is None and exc.stalled:
                raise HubTimeout(settings.endpoint, exc.seconds, f"resolving {repo_id}@{rev}") from None
            no_hub = f"the hub at {settings.endpoint} cannot be reached ({exc.reason})"
            hub_failure = HubUnreachable(repo_id, rev, settings.endpoint, exc.reason, str(settings.cache_dir))
        except (RepoNotFound, GatedRepo, HubError) as exc:
            # Like huggingface_hub: a private/gated repo whose token lapsed, or a hub outage, still
            # serves what is fully cached.
            sha, hub_failure = cached_ref(storage, rev), exc
            if sha is None:
                raise
            no_hub = f"the hub refused ({type(exc).__name__})"

    if sha is None:  # only when the hub is not asked and no ref is cached
        if hub_failure is not None:
            raise hub_failure
        raise NotCached(repo_id, rev, str(settings.cache_dir))

    local = _inspect_cache(repo_id, rev, sha, settings, trust_remote_code=trust_remote_code,
                           config_only=config_only)
    if not local.missing and (local.tree_known or no_hub):
        return _result(local, repo_id, rev, sha, started, downloaded=0, note=no_hub)
    if no_hub:
        if hub_failure is not None and not isinstance(hub_failure, HubUnreachable):
            raise hub_failure
        if not local.snapshot.is_dir():
            if hub_failure is not None:
                raise hub_failure
            raise NotCached(repo_id, rev, str(settings.cache_dir))
        raise IncompleteCache(repo_id, rev, str(local.snapshot), local.missing, no_hub)

    before = _blob_sizes(storage)
    outcome = _run_worker(
        {
            "repo_id": repo_id,
            "revision": rev,
            "sha": sha,
            "endpoint": settings.endpoint,
            "cache_dir": str(settings.cache_dir),
            "token": settings.token,
            "etag_timeout": min(settings.request_timeout, deadline),
            "trust_remote_code": trust_remote_code,
            "config_only": config_only,
        },
        ctx=ctx,
        storage=storage,
        timeout_s=deadline,
        quiet=quiet,
    )
    if not is_commit_sha(rev):
        _write_ref(storage, rev, sha)
    after = _blob_sizes(storage)
    downloaded = sum(size for name, size in after.items() if name not in before and not name.endswith(".incomplete"))
    done = _Local(local.snapshot, tuple(outcome["files"]), (), None, True)
    return _result(done, repo_id, rev, sha, started, downloaded=downloaded, note=None,
                   weights_format=outcome.get("weights_format"), skipped=tuple(outcome.get("skipped", ())))


def _result(local: _Local, repo_id: str, rev: str, sha: str, started: float, *, downloaded: int,
            note: str | None, weights_format: str | None = None, skipped: tuple[str, ...] = ()) -> FetchResult:
    if local.selection is not None:
        weights_format = local.selection.weights_format
        skipped = local.selection.skipped if local.tree_known else ()
    return FetchResult(
        path=local.snapshot,
        repo_id=repo_id,
        revision=rev,
        commit_sha=sha,
        files=local.files,
        bytes=_size_of(local.snapshot, local.files),
        downloaded_bytes=downloaded,
        seconds=time.monotonic() - started,
        from_cache=downloaded == 0,
        weights_format=weights_format,
        skipped=skipped,
        note=note,
    )


# --- the worker process ---------------------------------------------------------------------------

_WORKER_CODE = "from launcher.hub import _worker_main; _worker_main()"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _pump(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    try:
        for line in iter(stream.readline, b""):
            lines.put(line)
    finally:
        lines.put(None)


def _run_worker(request: dict, *, ctx: _Context, storage: Path, timeout_s: float, quiet: bool) -> dict:
    """Run the download in a child process; kill it when neither it nor the cache's blobs show any
    progress for ``timeout_s``. Its stderr is ours (huggingface_hub's progress bars and warnings);
    its stdout carries JSON lines: events, then one result or error."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    bars = not quiet and _stderr_is_terminal()
    if not bars:
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if quiet:
        env["HF_HUB_VERBOSITY"] = "error"
    # Plain HTTP downloads grow a ``blobs/*.incomplete`` file as bytes arrive, which is what the
    # stall watchdog below watches; Xet transfers assemble chunks elsewhere and would look stalled.
    env["HF_HUB_DISABLE_XET"] = "1"
    before = set(_blob_sizes(storage))
    doing = f"downloading {ctx.repo_id}@{ctx.revision}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,  # Ctrl-C reaches launch, which then stops the worker itself
    )
    lines: queue.Queue[bytes | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    outcome: dict | None = None
    finished = False
    try:
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
        except OSError:
            pass  # the worker died at once; its exit status tells
        last = time.monotonic()
        mark = _blob_sizes(storage)
        while True:
            try:
                line = lines.get(timeout=_POLL_S)
            except queue.Empty:
                line = b""
            if line is None:
                break
            now = time.monotonic()
            if line.strip():
                last = now
                try:
                    message = json.loads(line)
                except ValueError:
                    message = {}
                if "result" in message or "error" in message:
                    outcome = message
            current = _blob_sizes(storage)
            if current != mark:
                mark, last = current, now
            if now - last > timeout_s:
                if bars:
                    sys.stderr.write("\n")
                raise HubTimeout(ctx.endpoint, timeout_s, doing)
        proc.wait()
        finished = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not finished:
            _remove_abandoned_partials(storage, ctx.cache_dir, before)
    if outcome is None:
        raise HubError(ctx.repo_id, ctx.endpoint,
                       f"the download process ended with status {proc.returncode} and no result")
    if "error" in outcome:
        raise _rebuild_error(outcome["error"], ctx)
    return outcome["result"]


def _rebuild_error(data: Mapping[str, Any], ctx: _Context) -> LaunchError:
    cls = getattr(_errors, str(data.get("type", "")), None)
    if isinstance(cls, type) and issubclass(cls, LaunchError):
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(data.get("fields", {})).items()}
        try:
            return cls(**fields)
        except TypeError:
            pass
    return HubError(ctx.repo_id, ctx.endpoint, str(data))


def _worker_main() -> None:
    """Entry point of the worker process (see ``_run_worker``)."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the channel
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def emit(**message: Any) -> None:
        with lock:
            channel.write(json.dumps(message) + "\n")
            channel.flush()

    parent = os.getppid()

    def orphaned() -> None:  # launch was killed outright: stop downloading for nobody
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    request: dict = {}
    try:
        request = json.loads(sys.stdin.read())
        emit(result=_worker_fetch(request, emit))
    except LaunchError as err:
        emit(error={"type": type(err).__name__, "fields": err.facts()})
    except BaseException as exc:  # noqa: BLE001 - the parent turns it into one line
        emit(error={"type": "HubError", "fields": {
            "repo_id": request.get("repo_id", "?"), "endpoint": request.get("endpoint", "?"),
            "detail": f"{type(exc).__name__}: {_short_reason(exc)}"}})


def _worker_fetch(request: dict, emit: Callable[..., None]) -> dict:
    import logging
    import warnings

    # launch reports a full disk itself, in one line (huggingface_hub only warns, then fails).
    warnings.filterwarnings("ignore", message="Not enough free disk space")
    logging.getLogger("huggingface_hub._snapshot_download").setLevel(logging.ERROR)  # "No files matched"
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, sha, rev = request["repo_id"], request["sha"], request["revision"]
    cache_dir = Path(request["cache_dir"])
    storage = cache_dir / repo_folder(repo_id)
    ctx = _Context(repo_id, rev, request["endpoint"], cache_dir, bool(request["token"]))
    common = {
        "cache_dir": str(cache_dir),
        "endpoint": request["endpoint"],
        "token": request["token"],
        "etag_timeout": request["etag_timeout"],
    }
    from huggingface_hub.utils import tqdm as hf_tqdm

    class quiet_bars(hf_tqdm):  # no bars for the small first steps: one set, for the real download
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    needed: int | None = None
    try:
        if request["config_only"]:
            hf_hub_download(repo_id, CONFIG, revision=sha, **common)
            return {"files": [CONFIG], "skipped": [], "weights_format": None}
        # First config.json alone: huggingface_hub lists the tree once and caches it by commit.
        snapshot_download(repo_id, revision=sha, allow_patterns=[CONFIG], tqdm_class=quiet_bars, **common)
        emit(event="listed")
        tree = _cached_tree(storage, sha, repo_id, cache_dir) or _list_tree(repo_id, sha, common)
        if CONFIG not in tree:
            raise HubFileMissing(repo_id, rev, CONFIG)
        trust = bool(request["trust_remote_code"])
        selection = select_files(tree, trust_remote_code=trust)
        if selection.weights_format is None:
            raise NoWeights(repo_id, rev, _weight_like(tree))
        snapshot = storage / "snapshots" / sha
        if selection.index is not None:
            needed = _needed(tree, selection.meta, storage)
            _check_space(needed, cache_dir)
            snapshot_download(repo_id, revision=sha, allow_patterns=_exact(selection.meta), tqdm_class=quiet_bars,
                              **common)
            emit(event="metadata")
            weight_map = _read_weight_map(snapshot / selection.index)
            if weight_map is None:
                raise HubError(repo_id, request["endpoint"], f"its {selection.index} has no weight_map")
            selection = select_files(tree, trust_remote_code=trust, weight_map=weight_map)
            absent = [w for w in selection.weights if w not in tree]
            if absent:
                raise HubFileMissing(repo_id, rev, f"{absent[0]} (named in {selection.index})")
        needed = _needed(tree, selection.files, storage)
        _check_space(needed, cache_dir)
        snapshot_download(repo_id, revision=sha, allow_patterns=_exact(selection.files), **common)
        return {"files": list(selection.files), "skipped": list(selection.skipped),
                "weights_format": selection.weights_format}
    except Exception as exc:
        raise _hub_error(exc, ctx, needed) from exc


def _list_tree(repo_id: str, sha: str, common: dict) -> dict[str, _Entry]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=common["endpoint"], token=common["token"])
    return {
        f.path: _Entry(int(f.size), f.lfs.sha256 if f.lfs is not None else f.blob_id)
        for f in api.list_repo_tree(repo_id, revision=sha, recursive=True)
        if isinstance(f, RepoFile)
    }


def _needed(tree: Mapping[str, _Entry], files: Iterable[str], storage: Path) -> int:
    """Bytes still to download: files whose blob is not in the cache yet."""
    total = 0
    for name in files:
        entry = tree.get(name)
        if entry is None:
            continue
        if entry.etag is None or not (storage / "blobs" / entry.etag).exists():
            total += entry.size
    return total


def _check_space(needed: int, cache_dir: Path) -> None:
    free = _free_bytes(cache_dir)
    if free is not None and needed > free:
        raise DiskFull(str(cache_dir), needed, free)


# --- integrity ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheMismatch:
    path: str  # repo-relative file of the snapshot
    expected: str
    actual: str
    algorithm: str  # "sha256", "git-sha1", or "link" (the file is missing or not the listed blob)


def _hash_file(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cache(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> list[CacheMismatch]:
    """Check a cached snapshot without the network: every file's content must hash to the name of
    its blob (the ETag: sha256 for LFS files, git blob sha1 otherwise), and, when huggingface_hub
    cached the file list, be the blob that list names. An empty list means pristine.
    (``HfApi().verify_repo_checksums`` does the same against the Hub, so it needs the network.)"""
    if not looks_like_repo_id(repo_id):
        raise BadRepoId(repo_id)
    rev = _check_revision(revision or DEFAULT_REVISION)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hf_cache_dir()
    storage = cache / repo_folder(repo_id)
    sha = rev if is_commit_sha(rev) else cached_ref(storage, rev)
    snapshot = storage / "snapshots" / (sha or "-")
    if sha is None or not snapshot.is_dir():
        raise NotCached(repo_id, rev, str(cache), "there is nothing to verify")
    tree = _cached_tree(storage, sha, repo_id, cache) or {}
    blobs = (storage / "blobs").resolve()
    mismatches: list[CacheMismatch] = []
    for rel in _files_on_disk(snapshot):
        path = snapshot / rel
        real = Path(os.path.realpath(path))
        listed = tree.get(rel)
        if not real.is_file():
            mismatches.append(CacheMismatch(rel, listed.etag if listed and listed.etag else "a file", "missing",
                                            "link"))
            continue
        in_blobs = real.parent == blobs
        expected = listed.etag if listed is not None and listed.etag else (real.name if in_blobs else None)
        if expected is None:
            continue  # a plain file nobody listed: nothing to compare with
        if in_blobs and real.name != expected:
            mismatches.append(CacheMismatch(rel, expected, real.name, "link"))
        algorithm = "sha256" if len(expected) == 64 else "git-sha1"
        actual = _hash_file(real, algorithm)
        if actual != expected:
            mismatches.append(CacheMismatch(rel, expected, actual, algorithm))
    return mismatches


__all__ = [
    "CacheMismatch",
    "FetchResult",
    "HubSettings",
    "Selection",
    "fetch",
    "hub_timeout",
    "is_commit_sha",
    "looks_like_repo_id",
    "repo_folder",
    "select_files",
    "verify_cache",
]
