"""The overlay: a patched view of a model directory that never writes into the source.

Editing ``config.json`` inside a Hugging Face cache writes through the snapshot's symlink into a
blob shared by every snapshot and user. An overlay is a separate directory holding a real, patched
``config.json``, a symlink to the resolved file for everything else, and ``launch-patch.json``
(provenance and the manifest: every entry launch wrote). It is built in a temporary directory beside
the target and moved into place with one atomic rename, so a reader never sees half an overlay; two
concurrent builds of the same overlay both end with the same complete directory (the loser of the
rename adopts the winner's).

Data safety: launch deletes or replaces only what it can prove it wrote. An existing target is
replaced only when its manifest names every entry in it and it holds nothing else; the old overlay
is then removed entry by entry, as named in its manifest (never ``rmtree``), so a file that
appears in it meanwhile survives. Anything else is refused, saying what is there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from launcher.engine.spec import CHAT_TEMPLATE, PROVENANCE
from launcher.errors import LaunchError
from launcher.model.modeldir import CONFIG, MAX_CONFIG_BYTES, NotAModelDir
from launcher.model.owned import (
    ATTEMPTS,
    MANIFEST,
    OWN_FILES,
    OverlayConflict,
    OverlayNotWritable,
    check_replaceable_steady,
    foreign_entries,
    provenance_of,
    remove_own,
    stamp,
    walk_entries,
)
from launcher.runtime.outdir import check_out_path, inside, inside_hf_cache
from launcher.runtime.paths import UnreadableFile, overlays_dir, read_regular, slug


class StaleOverlay(LaunchError):
    path: str
    missing: tuple[str, ...] = ()
    message = (
        "overlay {path} points at files that are gone ({missing_list}); the source was moved or "
        "its cache pruned. Fetch the model again, then re-run."
    )


_SKIP_DIRS = {".git", ".cache", "__pycache__"}
MAX_SOURCE_FILES = 100_000
_BUSY = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # a rename's target is taken


def config_bytes(config: dict) -> bytes:
    """How launch writes a config.json: stable, readable, UTF-8 (a lone surrogate, which UTF-8
    cannot hold, as its JSON escape: it reads back as the same text)."""
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def source_files(source: Path) -> dict[str, str]:
    """Relative path -> resolved real file, for every file of ``source`` but its config.json and
    provenance. Linked subdirectories are followed (their files come out complete); a link loop,
    a broken link (an incomplete download) or a non-regular file is an error."""
    source = Path(source)
    files: dict[str, str] = {}
    stack: list[tuple[str, str, tuple[str, ...]]] = [(str(source), "", (os.path.realpath(source),))]
    while stack:
        dirpath, rel_dir, chain = stack.pop()
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError as err:
            raise NotAModelDir(str(source), f"cannot read {rel_dir or '.'}: {err.strerror or err}") from None
        for entry in entries:
            rel = entry.name if not rel_dir else f"{rel_dir}/{entry.name}"
            if entry.is_dir():  # follows links: a linked subdirectory is part of the model
                if entry.name in _SKIP_DIRS:
                    continue
                real = os.path.realpath(entry.path)
                if real in chain:
                    raise NotAModelDir(str(source), f"{rel} links back to a directory that contains it (a loop)")
                stack.append((entry.path, rel, chain + (real,)))
                continue
            if rel in OWN_FILES or entry.name.endswith(".incomplete"):
                continue
            real = os.path.realpath(entry.path)
            if not os.path.exists(real):
                raise NotAModelDir(str(source), f"{rel} points at a missing file; the download is incomplete")
            if not os.path.isfile(real):
                raise NotAModelDir(str(source), f"{rel} is not a regular file; a model directory holds files")
            files[rel] = real
            if len(files) > MAX_SOURCE_FILES:
                raise NotAModelDir(str(source), f"holds more than {MAX_SOURCE_FILES:,} files; is it a model directory?")
    return dict(sorted(files.items()))


# --- where overlays go ------------------------------------------------------------------------


def overlay_key(source: Path, patched: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(os.fsencode(os.path.realpath(source)))  # the path's own bytes, UTF-8 or not
    digest.update(b"\0")
    digest.update(patched)
    return digest.hexdigest()[:16]


def default_overlay_path(name: str, source: Path, patched: bytes) -> Path:
    """The overlay's place in launch's cache: the same source and config give the same place."""
    return overlays_dir() / f"{slug(name)}-{overlay_key(source, patched)}"


def _check_target(target: Path, source: Path | None) -> None:
    if source is not None and (inside(target, source) or inside(source, target)):
        raise OverlayConflict(str(target), "the overlay cannot be inside the model directory or contain it")
    if inside_hf_cache(target):
        raise OverlayConflict(str(target), "is inside the Hugging Face cache; launch never writes there")


@dataclass(frozen=True)
class Overlay:
    path: Path
    source: Path
    reused: bool
    files: int


def check_out(target: Path | str) -> Path:
    """Everything about an overlay's place that can be checked before any download: a usable name
    (``check_out_path``), not inside the Hugging Face cache, and either new, an empty directory, or
    an overlay launch can prove it wrote. Reads only; returns the target as a Path."""
    target = check_out_path(target)
    if inside_hf_cache(target):
        raise OverlayConflict(str(target), "is inside the Hugging Face cache; launch never writes there")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OverlayConflict(str(target), "exists and is not a directory; choose another --out")
    if target.exists():
        check_replaceable_steady(target)
    return target


# --- building ---------------------------------------------------------------------------------


def missing_links(path: Path) -> list[str]:
    """Files of an overlay whose link target is gone (the cache was pruned or the source moved)."""
    missing = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if os.path.islink(full) and not os.path.exists(full):
                missing.append(os.path.relpath(full, path))
    return sorted(missing)


def _matches(path: Path, source: Path, own: dict[str, bytes], files: dict[str, str]) -> bool:
    """``path`` is a complete overlay of exactly this source, config, own files and file set."""
    prov = provenance_of(path)
    if prov is None or prov.get("source") != os.path.realpath(source):
        return False
    try:
        if any(read_regular(path / name, MAX_CONFIG_BYTES) != data for name, data in own.items()
               if name != PROVENANCE):
            return False
    except (OSError, UnreadableFile):
        return False
    for rel, real in files.items():
        link = path / rel
        if not link.is_symlink() or os.readlink(link) != real:
            return False
    present, _dirs = walk_entries(path)
    return present == set(files) | set(own)


def _write_tree(tmp: Path, own: dict[str, bytes], files: dict[str, str]) -> None:
    for rel, real in files.items():
        link = tmp / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(real, link)
    for name, data in own.items():
        (tmp / name).write_bytes(data)


def _not_writable(target: Path, err: OSError) -> OverlayNotWritable:
    return OverlayNotWritable(str(target), err.strerror or str(err))


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p ``directory``; returns the directories it created, deepest last."""
    missing = []
    for parent in [directory, *directory.parents]:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    directory.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def build_overlay(source: Path, patched_config: dict, provenance: dict, target: Path,
                  chat_template: dict | None = None) -> Overlay:
    """Make ``target`` a complete overlay of ``source`` with ``patched_config`` (and a chat template
    file for lmdeploy when given); reuse it when it already is one. ``source`` is never written;
    an existing ``target`` is replaced only when launch can prove it wrote all of it."""
    source = Path(source)
    target = check_out_path(target)
    _check_target(target, source)  # the more precise message first
    check_out(target)
    files = source_files(source)
    own = {CONFIG: config_bytes(patched_config)}
    if chat_template:
        own[CHAT_TEMPLATE] = config_bytes(chat_template)
    manifest = {rel: "link:" + real for rel, real in files.items()}
    manifest.update({name: stamp(data) for name, data in own.items()}, **{PROVENANCE: "self"})
    provenance = {**provenance, "tool": provenance.get("tool", "launch"), "source": os.path.realpath(source),
                  MANIFEST: dict(sorted(manifest.items()))}
    own[PROVENANCE] = config_bytes(provenance)

    if target.exists() and _matches(target, source, own, files):
        return Overlay(target, source, reused=True, files=len(files))

    created: list[Path] = []
    try:
        created = _make_parents(target.parent)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        _remove_empty(created)
        raise _not_writable(target, err) from None
    try:
        _write_tree(tmp, own, files)
        _move_into_place(tmp, target, source, own, files)
    except OSError as err:
        raise _not_writable(target, err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory, never the user's
        if not target.exists():
            _remove_empty(created)
    return Overlay(target, source, reused=False, files=len(files))


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            break


def _move_into_place(tmp: Path, target: Path, source: Path, own: dict[str, bytes], files: dict[str, str]) -> None:
    """Rename ``tmp`` to ``target``. When ``target`` is taken: adopt it if it is this very overlay,
    else replace it if launch can prove it wrote all of it (concurrent runs with other settings:
    the last one wins, none fails), else refuse."""
    for _attempt in range(ATTEMPTS):
        try:
            _keep_mode(tmp, target)
            os.rename(tmp, target)  # atomic; replaces an empty directory; fails on a non-empty one
            return
        except OSError as err:
            if err.errno not in _BUSY:
                raise
        if _matches(target, source, own, files):
            return  # a concurrent run finished the same overlay first: adopt it
        if not target.is_dir() or target.is_symlink():
            if not target.exists() and not target.is_symlink():
                continue  # another run moved it away meanwhile
            raise OverlayConflict(str(target), "exists and is not a directory; choose another --out")
        try:
            check_replaceable_steady(target)  # an overlay of launch's own, and nothing else in it
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        except (FileNotFoundError, OverlayNotWritable):
            if target.exists():
                raise
            continue  # another run moved it away meanwhile
        left = foreign_entries(old)
        if left or left is None and any(old.iterdir()):
            # Something appeared in it since the check: put it back untouched and refuse.
            try:
                os.rename(old, target)
            except OSError:
                pass
            raise OverlayConflict(str(target), "changed while launch was replacing it; nothing was removed. Run again")
        try:
            _keep_mode(tmp, old)
            os.rename(tmp, target)
            return
        except OSError as err:
            if err.errno not in _BUSY:
                raise
        finally:
            remove_own(old)
    raise OverlayNotWritable(str(target), "other launch runs kept replacing it at the same time")


def _keep_mode(tmp: Path, replaced: Path) -> None:
    """The directory that ``tmp`` takes the place of keeps its permissions: an empty 0700 ``--out``
    stays 0700 once the overlay is in it (``tmp`` was made with the umask's mode)."""
    try:
        mode = os.lstat(replaced).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        os.chmod(tmp, stat.S_IMODE(mode))


def check_overlay(path: Path) -> None:
    """Raise StaleOverlay when links of an overlay no longer resolve (check before serving)."""
    missing = missing_links(Path(path))
    if missing:
        raise StaleOverlay(str(path), tuple(missing[:5]))


def check_target(target: Path | str, source: Path | None = None) -> Path:
    """Refuse, before anything is downloaded or written, a ``--out`` that ``build_overlay`` would
    refuse whatever it writes (``source`` None: not known yet, e.g. a repo id not downloaded)."""
    target = check_out_path(target)
    _check_target(target, source)
    return check_out(target)
