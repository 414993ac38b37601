"""The Hugging Face cache, read only and offline, through huggingface_hub's public API: which commit
a revision points at (``try_to_load_from_cache`` reads its ``refs/``), what huggingface_hub listed of a
commit (``get_cached_repo_tree``), what of it serving needs is there; and ``FetchResult``, a snapshot
as launcher/model/hub.py hands it back. Settings are checked (launcher/model/hubenv.py) before huggingface_hub is
imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launcher.errors import LaunchError
from launcher.model import hubenv
from launcher.model.selection import Selection, read_weight_map, select_files, serving_files
from launcher.runtime.paths import DEFAULT_REVISION, is_commit_sha, repo_folder


class NotCached(LaunchError):
    """The cache does not hold the revision at all, and ``reason`` says why the hub is not asked."""

    repo_id: str
    revision: str
    cache_dir: str
    reason: str = "HF_HUB_OFFLINE is set"
    message = ("{repo_id}@{revision} is not in the Hugging Face cache at {cache_dir} ({reason}). Run "
               "`launch fetch {repo_id}` with the hub reachable and HF_HUB_OFFLINE unset to download it.")


def human_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as huggingface_hub's progress bars show them)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


CONFIG = "config.json"


def cached_config(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """config.json of ``repo_id`` at ``revision`` (branch, tag or commit; default main) in the cache
    (default: the settings' own), found by huggingface_hub's lookup of its refs/, or None. A ref
    that names no commit folder of the snapshots (a hand-edited ``../x``) counts as none."""
    cache_dir = cache_dir or hubenv.read().cache_dir
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CONFIG, cache_dir=cache_dir,
                                       revision=revision or DEFAULT_REVISION)
    except (OSError, ValueError):  # a ref that is a folder, or not text
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    ours = snapshot.parent == Path(cache_dir) / repo_folder(repo_id) / "snapshots"
    return Path(found) if ours and is_commit_sha(snapshot.name) else None


def cached_tree(repo_id: str, sha: str, cache_dir: Path) -> dict[str, Any] | None:
    """``{path: RepoFile}`` at ``sha`` as huggingface_hub listed it into the cache, or None. A
    RepoFile's ``blob_id`` (git blob sha1) names a plain file's blob, not an LFS file's."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path: f for f in get_cached_repo_tree(repo_id, revision=sha, cache_dir=cache_dir)}
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def blob_sizes(storage: Path) -> dict[str, int]:
    """``{blob name: size}`` of a repo's cache folder, partial downloads included."""
    try:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(storage / "blobs")}
    except OSError:
        return {}


def in_cache(repo_id: str, revision: str, cache_dir: Path, sha: str,
             trust_remote_code: bool) -> tuple[Selection, tuple[str, ...], bool]:
    """What the cache holds of commit ``sha`` by launch's selection rules: the selection, the files
    of it missing, and whether huggingface_hub's listing was there to choose from (else the
    snapshot's own files are taken, and at least config + weights are required)."""
    snapshot = cache_dir / repo_folder(repo_id) / "snapshots" / sha
    tree = cached_tree(repo_id, sha, cache_dir)
    if tree is not None:
        paths = list(tree)
        selection = serving_files(paths, repo_id, revision, trust_remote_code=trust_remote_code)
    else:
        paths = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*")
                       if p.is_file() or p.is_symlink())
        selection = select_files(paths, trust_remote_code=trust_remote_code)
    if selection.index and (weight_map := read_weight_map(snapshot / selection.index)):
        selection = select_files(paths, trust_remote_code=trust_remote_code, weight_map=weight_map)
    missing = [f for f in selection.files if not (snapshot / f).is_file()]
    if tree is None:  # what the repo has besides is not known: nothing is said skipped
        missing += [CONFIG] if CONFIG not in missing and not (snapshot / CONFIG).is_file() else []
        missing += ["model weights"] if selection.weights_format is None else []
        selection = replace(selection, skipped=())
    return selection, tuple(missing), tree is not None


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
        bin_only = self.weights_format == "bin"
        extra = "; the repo has no safetensors, so its .bin weights were taken" if bin_only else ""
        return f"{head}: {len(self.files)} files, {human_bytes(self.bytes)}, {tail}{extra}"


__all__ = ["CONFIG", "FetchResult", "blob_sizes", "cached_config", "cached_tree", "in_cache"]
