"""Fetch checkpoints from the Hugging Face Hub into its standard cache: only what serving needs
(launcher/model/selection.py chooses), under deadlines, with clear errors and no request when the cache can answer.

All through huggingface_hub's public API: ``HfApi.model_info`` resolves a branch, ``snapshot_download``
lists the files (recording ``refs/`` and the listing), ``hf_hub_download`` downloads; launcher/model/hubcache.py
reads the cache offline. Settings are read and checked at each call by launcher/model/hubenv.py before
huggingface_hub is imported; every error leaving here has its secrets taken out (``hubenv.scrub``).
launcher/model/hubcall.py holds each call to its deadlines and translates what huggingface_hub raises.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from launcher.errors import LaunchError
from launcher.model import hubenv
from launcher.model.hubcache import (
    CONFIG,
    FetchResult,
    NotCached,
    blob_sizes,
    cached_config,
    cached_tree,
    in_cache,
)
from launcher.model.hubcall import (
    CacheNotWritable,
    Call,
    DiskFull,
    HubError,
    HubTimeout,
    HubUnreachable,
    RevisionNotFound,
    hf_output,
    redacted,
    translate,
    watched,
)
from launcher.model.selection import HubFileMissing, Selection, read_weight_map, select_files, serving_files
from launcher.runtime.paths import is_commit_sha


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



def _result(call: Call, snapshot: Path, selection: Selection, started: float,
            before: dict[str, int] | None = None, note: str | None = None) -> FetchResult:
    """``before``: the blobs before downloading (None: nothing was)."""
    size = sum((snapshot / f).stat().st_size for f in selection.files if (snapshot / f).is_file())
    new = 0 if before is None else sum(n for b, n in blob_sizes(call.storage).items() if b not in before)
    return FetchResult(snapshot, call.repo_id, call.revision, snapshot.name, selection.files, size, new,
                       time.monotonic() - started, new == 0, selection.weights_format, selection.skipped,
                       note)


# --- fetching ---------------------------------------------------------------------------------


def _commit(call: Call) -> tuple[str, LaunchError | None]:
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
            sha = watched(resolving, [lambda: api.model_info(call.repo_id, revision=call.revision,
                                                              timeout=call.wait_s).sha], metadata=True)[0]
        except Exception as exc:
            failure = exc if isinstance(exc, LaunchError) else translate(exc, resolving)
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


@redacted
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
    ``timeout_s`` (default ``$LAUNCH_HUB_TIMEOUT``, else 600): see ``watched``. ``commit``: the
    commit ``revision`` was resolved to when the plan was made; its files are the ones fetched.

    Requests: none when the revision is a commit sha complete in the cache, or with
    HF_HUB_OFFLINE=1; one for a branch or tag already complete in the cache. An unreachable hub
    falls back to a complete cache; a partial one is IncompleteCache.
    """
    started = time.monotonic()
    call = Call.now(repo_id, revision, timeout_s, commit)
    try:
        with hf_output(warnings=not quiet, bars=not quiet and sys.stderr.isatty()):
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
        raise translate(exc, call) from exc


def _download(call: Call, trust_remote_code: bool, started: float) -> FetchResult:
    from huggingface_hub import hf_hub_download, snapshot_download

    common = {"cache_dir": call.cache_dir, "endpoint": call.endpoint, "etag_timeout": call.wait_s}
    existing = hubenv.existing(call.storage)
    if not os.access(existing, os.W_OK):  # huggingface_hub would list the files, then fail or warn
        raise CacheNotWritable(str(call.cache_dir), f"{existing} is read-only or not writable by this user")
    before = blob_sizes(call.storage)

    def listing(revision: str) -> Path:  # no pattern matches: nothing is downloaded yet (and the
        with hf_output(warnings=False, bars=False):  # "No files matched" warning is not the user's)
            task = (lambda: snapshot_download(call.repo_id, revision=revision, allow_patterns=[], **common))
            return Path(watched(replace(call, doing=f"listing the files of {call.repo_id}@{revision}"), [task],
                                 metadata=True)[0])

    # The file list at the revision asked for, so that huggingface_hub records where it points
    # (refs/, for offline use later); at the planned commit instead if the branch moved or went since.
    try:
        path = listing(call.revision)
    except Exception as exc:
        if not call.commit or not isinstance(translate(exc, call), RevisionNotFound):
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
        watched(call, [lambda name=name: hf_hub_download(call.repo_id, name, revision=path.name, **common)
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


@redacted
def read_config(repo_id: str, *, revision: str | None = None,
                timeout_s: float | str | None = None) -> tuple[bytes, str]:
    """``(config.json bytes, commit sha)`` of ``repo_id`` at ``revision``, for checks that may still
    refuse the command: nothing is written that stays, the Hugging Face cache included. Read from
    the cache when it holds that commit's config (no request for a pinned sha or offline, one for a
    branch), else downloaded by huggingface_hub into a temporary directory removed afterwards."""
    import tempfile

    call = Call.now(repo_id, revision, timeout_s)
    call = replace(call, doing=f"reading {repo_id}@{call.revision} config.json")
    from huggingface_hub import hf_hub_download

    try:
        sha, failure = _commit(call)
        if (cached := call.snapshot(sha) / CONFIG).is_file():
            return cached.read_bytes(), sha
        if failure is not None:
            raise failure
        with tempfile.TemporaryDirectory(prefix="launch-config-", ignore_cleanup_errors=True) as tmp:
            got = watched(call, [lambda: hf_hub_download(repo_id, CONFIG, revision=sha, local_dir=tmp,
                                                          endpoint=call.endpoint, etag_timeout=call.wait_s)],
                           metadata=True)
            return Path(got[0]).read_bytes(), sha
    except LaunchError:
        raise
    except Exception as exc:
        raise translate(exc, call) from exc


__all__ = ["FetchResult", "fetch", "read_config"]
