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
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

from launcher.engine.spec import CHAT_TEMPLATE, PROVENANCE
from launcher.errors import LaunchError
from launcher.model.modeldir import CONFIG, MAX_CONFIG_BYTES, NotAModelDir
from launcher.runtime.paths import hf_cache_dir, overlays_dir, slug


class OverlayNotWritable(LaunchError):
    path: str
    problem: str
    message = (
        "cannot write the overlay at {path}: {problem}. "
        "Pick another place with --out or LAUNCH_CACHE_DIR."
    )


class OverlayConflict(LaunchError):
    """--out (or an overlay's place) holds something launch cannot prove it wrote."""

    path: str
    problem: str
    message = "{path}: {problem}"


class BadOutPath(LaunchError):
    """An --out that cannot name an overlay directory (empty, too long, control characters)."""

    path: str
    problem: str
    exit_code = 2
    message = "--out {path}: {problem}"


class StaleOverlay(LaunchError):
    path: str
    missing: tuple[str, ...] = ()
    message = (
        "overlay {path} points at files that are gone ({missing_list}); the source was moved or "
        "its cache pruned. Fetch the model again, then re-run."
    )


OWN_FILES = (CONFIG, PROVENANCE, CHAT_TEMPLATE)  # real files launch writes; everything else is a link
MANIFEST = "files"  # the provenance key listing every entry of the overlay
_SKIP_DIRS = {".git", ".cache", "__pycache__"}
MAX_SOURCE_FILES = 100_000
NAME_MAX = 255  # bytes in one path component (Linux, macOS)
# The temporary names beside the target add ".", ".tmp-<pid>-<8 hex>" / ".old-<8 hex>".
_TMP_SUFFIX = 40
PATH_MAX = 4000
_BUSY = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # a rename's target is taken
_ATTEMPTS = 8  # concurrent runs replacing one overlay: how often to look again


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


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def check_out_path(path: Path | str, example: str = "./my-overlay") -> Path:
    """``--out`` as a place for a new directory (an overlay; a probe or ppl run), or BadOutPath saying
    why it cannot be one: the current directory or a root, control characters (or bytes that are not
    UTF-8), a name too long for the file system. Pure: looks at the text only."""
    text = os.fspath(path)
    if _has_control(text):
        raise BadOutPath(ascii(text), "contains a control character or bytes that are not UTF-8; "
                         "give a plain directory name")
    target = Path(text).expanduser()
    if text.strip() in ("", ".", "..") or target.name in ("", ".", ".."):
        raise BadOutPath(repr(text), f"names no new directory; give one, e.g. --out {example}")
    for part in target.parts:
        size = len(part.encode("utf-8", "surrogateescape"))
        limit = NAME_MAX - _TMP_SUFFIX if part == target.name else NAME_MAX
        if size > limit:
            raise BadOutPath(repr(text[:40] + "..."), f"a name in it is {size} bytes long; at most {limit} fit here")
    if len(text.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise BadOutPath(repr(text[:40] + "..."), f"the path is longer than {PATH_MAX} bytes")
    return target


def _inside(path: Path, parent: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(parent))
        return True
    except ValueError:
        return False


def inside_hf_cache(path: Path) -> bool:
    """``path`` (links resolved) is in the Hugging Face cache, where launch never writes."""
    return _inside(path, hf_cache_dir())


def _check_target(target: Path, source: Path | None) -> None:
    if source is not None and (_inside(target, source) or _inside(source, target)):
        raise OverlayConflict(str(target), "the overlay cannot be inside the model directory or contain it")
    if inside_hf_cache(target):
        raise OverlayConflict(str(target), "is inside the Hugging Face cache; launch never writes there")


# --- what launch can prove it wrote -----------------------------------------------------------


@dataclass(frozen=True)
class Overlay:
    path: Path
    source: Path
    reused: bool
    files: int


def _provenance_of(path: Path) -> dict | None:
    try:
        data = json.loads((path / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _manifest(path: Path) -> dict[str, str] | None:
    """What launch's provenance in ``path`` says it wrote: relative path -> ``link:TARGET`` or
    ``sha256:HEX`` (its own provenance: ``self``). None when there is no provenance of launch with a
    manifest: then launch cannot prove anything there is its own."""
    prov = _provenance_of(path)
    entries = prov.get(MANIFEST) if prov else None
    if prov is None or prov.get("tool") != "launch" or not isinstance(entries, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        return None
    return entries if entries.get(PROVENANCE) == "self" else None


def _stamp(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _as_written(full: str, expected: str) -> bool:
    """The entry at ``full`` is still exactly what launch wrote there."""
    if expected.startswith("link:"):
        try:
            return os.readlink(full) == expected[5:]
        except OSError:  # not a link, or gone since the walk (another run swapped its overlay in)
            return False
    if expected.startswith("sha256:") and os.path.isfile(full) and not os.path.islink(full):
        try:
            with open(full, "rb") as handle:
                return _stamp(handle.read(MAX_CONFIG_BYTES + 1)) == expected
        except OSError:
            return False
    return expected == "self" and os.path.isfile(full) and not os.path.islink(full)


def _entries(path: Path) -> tuple[set[str], set[str]]:
    """Every file or link (relative) and every real subdirectory under ``path``, links not followed."""
    files, dirs = set(), set()
    for root, subdirs, names in os.walk(path):
        rel_root = os.path.relpath(root, path)
        prefix = "" if rel_root == "." else rel_root + "/"
        for name in subdirs:
            full = os.path.join(root, name)
            (files if os.path.islink(full) else dirs).add(prefix + name)
        files.update(prefix + name for name in names)
    return files, dirs


def _foreign(path: Path) -> list[str] | None:
    """What in ``path`` launch did not write, or changed since: [] when its manifest names every
    entry and each is as launch wrote it (the same link, the same bytes); None when there is no
    manifest at all."""
    manifest = _manifest(path)
    if manifest is None:
        return None
    files, dirs = _entries(path)
    parents = {str(p) for n in manifest for p in Path(n).parents if str(p) != "."}
    changed = {n for n in files & set(manifest) if not _as_written(os.path.join(path, n), manifest[n])}
    return sorted((files - set(manifest)) | changed | (dirs - parents))


def _describe(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_replaceable(target: Path) -> None:
    """Refuse unless ``target`` is empty or an overlay launch wrote, with nothing else in it."""
    foreign = _foreign(target)
    if foreign is None:
        try:
            present = sorted(p.name for p in target.iterdir())
        except OSError as err:
            raise OverlayNotWritable(str(target), err.strerror or str(err)) from None
        if not present:
            return
        prov = _provenance_of(target)
        files, _dirs = _entries(target)
        if prov is not None and prov.get("tool") == "launch" and all(
                name in OWN_FILES or os.path.islink(target / name) for name in files):
            raise OverlayConflict(
                str(target),
                "looks like an overlay of an older launch, which kept no manifest of its entries, so launch "
                "cannot prove all of it is its own. Delete it yourself if it is, or choose another --out",
            )
        raise OverlayConflict(
            str(target),
            f"exists and is not a launch overlay (it holds {_describe(present)}); launch replaces only "
            "what it wrote itself. Choose another --out, or empty it yourself",
        )
    if foreign:
        raise OverlayConflict(
            str(target),
            f"holds {_describe(foreign)}, which launch did not write (or which changed since); launch "
            "replaces only what it wrote itself. Move those away, or choose another --out",
        )


def _identity(path: Path) -> tuple[bytes | None, int | None]:
    """The provenance's bytes and the directory's inode: another launch run that swaps its own
    overlay in changes the inode, even with the same settings (the same bytes)."""
    try:
        data: bytes | None = (path / PROVENANCE).read_bytes()
    except OSError:
        data = None
    try:
        return data, os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return data, None


def _check_replaceable_steady(target: Path) -> None:
    """``_check_replaceable``, telling a real conflict from another launch run swapping its own
    overlay in while this one looked (then the check is simply repeated)."""
    for _attempt in range(_ATTEMPTS):
        seen = _identity(target)
        try:
            _check_replaceable(target)
            return
        except (OverlayConflict, OverlayNotWritable):
            if _identity(target) == seen and target.exists():
                raise
            if not target.exists():
                return
    _check_replaceable(target)


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
        _check_replaceable_steady(target)
    return target


def _remove_own(path: Path) -> None:
    """Remove what the manifest of ``path`` names (its provenance last), then the directories that
    leaves empty. Anything else stays where it is (and so does ``path`` then)."""
    manifest = _manifest(path) or {}
    for root, subdirs, names in os.walk(path, topdown=False):
        rel_root = os.path.relpath(root, path)
        prefix = "" if rel_root == "." else rel_root + "/"
        for name in names + [d for d in subdirs if os.path.islink(os.path.join(root, d))]:
            rel, full = prefix + name, os.path.join(root, name)
            if rel in manifest and rel != PROVENANCE and _as_written(full, manifest[rel]):
                try:
                    os.unlink(full)
                except OSError:
                    pass
        if root != str(path):
            try:
                os.rmdir(root)
            except OSError:
                pass
    try:
        if PROVENANCE in manifest:
            os.unlink(path / PROVENANCE)
        os.rmdir(path)
    except OSError:
        pass


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
    prov = _provenance_of(path)
    if prov is None or prov.get("source") != os.path.realpath(source):
        return False
    try:
        if any((path / name).read_bytes() != data for name, data in own.items() if name != PROVENANCE):
            return False
    except OSError:
        return False
    for rel, real in files.items():
        link = path / rel
        if not link.is_symlink() or os.readlink(link) != real:
            return False
    entries, _dirs = _entries(path)
    return entries == set(files) | set(own)


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
    manifest.update({name: _stamp(data) for name, data in own.items()}, **{PROVENANCE: "self"})
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
    for _attempt in range(_ATTEMPTS):
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
            _check_replaceable_steady(target)  # an overlay of launch's own, and nothing else in it
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        except (FileNotFoundError, OverlayNotWritable):
            if target.exists():
                raise
            continue  # another run moved it away meanwhile
        foreign = _foreign(old)
        if foreign or foreign is None and any(old.iterdir()):
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
            _remove_own(old)
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
