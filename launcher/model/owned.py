"""What launch can prove it wrote in an overlay directory, and nothing else is ever replaced or removed.

An overlay's ``launch-patch.json`` (provenance) carries a manifest: every entry launch wrote, as
``link:TARGET`` or ``sha256:HEX`` (itself: ``self``). A directory is launch's to replace only when the
manifest names every entry in it and each is still as written; removal goes entry by entry, as named
(never ``rmtree``), so a file that appears meanwhile survives."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from launcher.engine.spec import CHAT_TEMPLATE, PROVENANCE
from launcher.errors import LaunchError
from launcher.model.modeldir import CONFIG, MAX_CONFIG_BYTES
from launcher.runtime.paths import UnreadableFile, read_regular

OWN_FILES = (CONFIG, PROVENANCE, CHAT_TEMPLATE)  # real files launch writes; everything else is a link
MANIFEST = "files"  # the provenance key listing every entry of the overlay
ATTEMPTS = 8  # concurrent runs replacing one overlay: how often to look again


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
    exit_code = 2  # a --out that is taken is bad input, as probe's and ppl's
    message = "{path}: {problem}"


def provenance_of(path: Path) -> dict | None:
    try:  # a FIFO or a device in its place is refused, never waited on
        data = json.loads(read_regular(path / PROVENANCE, MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnreadableFile, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def manifest_of(path: Path) -> dict[str, str] | None:
    """What launch's provenance in ``path`` says it wrote: relative path -> ``link:TARGET`` or
    ``sha256:HEX`` (its own provenance: ``self``). None when there is no provenance of launch with a
    manifest: then launch cannot prove anything there is its own."""
    prov = provenance_of(path)
    entries = prov.get(MANIFEST) if prov else None
    if prov is None or prov.get("tool") != "launch" or not isinstance(entries, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        return None
    return entries if entries.get(PROVENANCE) == "self" else None


def stamp(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def as_written(full: str, expected: str) -> bool:
    """The entry at ``full`` is still exactly what launch wrote there."""
    if expected.startswith("link:"):
        try:
            return os.readlink(full) == expected[5:]
        except OSError:  # not a link, or gone since the walk (another run swapped its overlay in)
            return False
    if expected.startswith("sha256:") and os.path.isfile(full) and not os.path.islink(full):
        try:
            with open(full, "rb") as handle:
                return stamp(handle.read(MAX_CONFIG_BYTES + 1)) == expected
        except OSError:
            return False
    return expected == "self" and os.path.isfile(full) and not os.path.islink(full)


def walk_entries(path: Path) -> tuple[set[str], set[str]]:
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


def foreign_entries(path: Path) -> list[str] | None:
    """What in ``path`` launch did not write, or changed since: [] when its manifest names every
    entry and each is as launch wrote it (the same link, the same bytes); None when there is no
    manifest at all."""
    manifest = manifest_of(path)
    if manifest is None:
        return None
    files, dirs = walk_entries(path)
    parents = {str(p) for n in manifest for p in Path(n).parents if str(p) != "."}
    changed = {n for n in files & set(manifest) if not as_written(os.path.join(path, n), manifest[n])}
    return sorted((files - set(manifest)) | changed | (dirs - parents))


def _describe(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_replaceable(target: Path) -> None:
    """Refuse unless ``target`` is empty or an overlay launch wrote, with nothing else in it."""
    foreign = foreign_entries(target)
    if foreign is None:
        try:
            present = sorted(p.name for p in target.iterdir())
        except OSError as err:
            raise OverlayNotWritable(str(target), err.strerror or str(err)) from None
        if not present:
            return
        prov = provenance_of(target)
        files, _dirs = walk_entries(target)
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
        data: bytes | None = read_regular(path / PROVENANCE, MAX_CONFIG_BYTES)
    except (OSError, UnreadableFile):
        data = None
    try:
        return data, os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return data, None


def check_replaceable_steady(target: Path) -> None:
    """``check_replaceable``, telling a real conflict from another launch run swapping its own
    overlay in while this one looked (then the check is simply repeated)."""
    for _attempt in range(ATTEMPTS):
        seen = _identity(target)
        try:
            check_replaceable(target)
            return
        except (OverlayConflict, OverlayNotWritable):
            if _identity(target) == seen and target.exists():
                raise
            if not target.exists():
                return
    check_replaceable(target)


def remove_own(path: Path) -> None:
    """Remove what the manifest of ``path`` names (its provenance last), then the directories that
    leaves empty. Anything else stays where it is (and so does ``path`` then)."""
    manifest = manifest_of(path) or {}
    for root, subdirs, names in os.walk(path, topdown=False):
        rel_root = os.path.relpath(root, path)
        prefix = "" if rel_root == "." else rel_root + "/"
        for name in names + [d for d in subdirs if os.path.islink(os.path.join(root, d))]:
            rel, full = prefix + name, os.path.join(root, name)
            if rel in manifest and rel != PROVENANCE and as_written(full, manifest[rel]):
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
