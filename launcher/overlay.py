"""The overlay: a patched view of a model directory that never writes into the source.

Editing ``config.json`` inside a Hugging Face cache writes through the snapshot's symlink into a
blob shared by every snapshot and user. An overlay is a separate directory holding a real, patched
``config.json``, a symlink to the resolved file for everything else, and ``launch-patch.json``
(provenance). It is built in a temporary directory beside the target and moved into place with one
atomic rename, so a reader never sees half an overlay; two concurrent builds of the same overlay
both end with the same complete directory (the loser of the rename adopts the winner's).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import MalformedConfig, NotAModelDir, OverlayConflict, OverlayNotWritable, StaleOverlay
from .paths import hf_cache_dir, overlays_dir

CONFIG = "config.json"
PROVENANCE = "launch-patch.json"
CHAT_TEMPLATE = "launch-chat-template.json"  # lmdeploy ChatTemplateConfig, for --chat-template
OWN_FILES = (CONFIG, PROVENANCE, CHAT_TEMPLATE)  # real files launch writes; everything else is a link
_SKIP_DIRS = {".git", ".cache", "__pycache__"}


# --- reading a model directory ----------------------------------------------------------------


def read_model_config(model_dir: Path) -> dict:
    """The parsed ``config.json`` of a model directory (NotAModelDir / MalformedConfig)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NotAModelDir(str(model_dir), "no such directory")
    path = model_dir / CONFIG
    if not path.is_file():
        raise NotAModelDir(str(model_dir), "has no config.json; is it a Hugging Face model directory?")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NotAModelDir(str(model_dir), f"cannot read config.json: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise MalformedConfig(str(path), "not UTF-8 text") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedConfig(str(path), f"{err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(config, dict):
        raise MalformedConfig(str(path), "the top level is not an object")
    return config


def config_bytes(config: dict) -> bytes:
    """How launch writes a config.json: stable, readable, UTF-8."""
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def source_files(source: Path) -> dict[str, str]:
    """Relative path -> resolved real file, for every file of ``source`` but its config.json and
    provenance. A broken link (an incomplete download) is an error."""
    source = Path(source)
    files: dict[str, str] = {}
    for root, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        rel_root = os.path.relpath(root, source)
        for name in sorted(names):
            rel = name if rel_root == "." else os.path.join(rel_root, name)
            if rel in OWN_FILES or name.endswith(".incomplete"):
                continue
            real = os.path.realpath(os.path.join(root, name))
            if not os.path.isfile(real):
                raise NotAModelDir(str(source), f"{rel} points at a missing file; the download is incomplete")
            files[rel] = real
    return files


# --- where overlays go ------------------------------------------------------------------------


def slug(name: str) -> str:
    """``name`` made safe as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def overlay_key(source: Path, patched: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(os.path.realpath(source).encode())
    digest.update(b"\0")
    digest.update(patched)
    return digest.hexdigest()[:16]


def default_overlay_path(name: str, source: Path, patched: bytes) -> Path:
    """The overlay's place in launch's cache: the same source and config give the same place."""
    return overlays_dir() / f"{slug(name)}-{overlay_key(source, patched)}"


def _inside(path: Path, parent: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(parent))
        return True
    except ValueError:
        return False


def _check_target(target: Path, source: Path | None) -> None:
    if source is not None and (_inside(target, source) or _inside(source, target)):
        raise OverlayConflict(str(target), "the overlay cannot be inside the model directory or contain it")
    if _inside(target, hf_cache_dir()):
        raise OverlayConflict(str(target), "is inside the Hugging Face cache; launch never writes there")


# --- building ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlay:
    path: Path
    source: Path
    reused: bool
    files: int


def _provenance_of(path: Path) -> dict | None:
    try:
        data = json.loads((path / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    linked = {
        os.path.relpath(os.path.join(root, name), path)
        for root, _dirs, names in os.walk(path)
        for name in names
        if name not in own or root != str(path)
    }
    return linked == set(files)


def _write_tree(tmp: Path, own: dict[str, bytes], files: dict[str, str]) -> None:
    for rel, real in files.items():
        link = tmp / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(real, link)
    for name, data in own.items():
        (tmp / name).write_bytes(data)


def _not_writable(target: Path, err: OSError) -> OverlayNotWritable:
    return OverlayNotWritable(str(target), err.strerror or str(err))


def build_overlay(source: Path, patched_config: dict, provenance: dict, target: Path,
                  chat_template: dict | None = None) -> Overlay:
    """Make ``target`` a complete overlay of ``source`` with ``patched_config`` (and a chat template
    file for lmdeploy when given); reuse it when it already is one. ``source`` is never written."""
    source = Path(source)
    target = Path(target).expanduser()
    _check_target(target, source)
    files = source_files(source)
    provenance = {**provenance, "source": os.path.realpath(source)}
    own = {CONFIG: config_bytes(patched_config), PROVENANCE: config_bytes(provenance)}
    if chat_template:
        own[CHAT_TEMPLATE] = config_bytes(chat_template)

    if target.exists() or target.is_symlink():
        if target.is_symlink() or not target.is_dir():
            raise OverlayConflict(str(target), "exists and is not a directory; choose another --out")
        if _matches(target, source, own, files):
            return Overlay(target, source, reused=True, files=len(files))
        if any(target.iterdir()) and _provenance_of(target) is None:
            raise OverlayConflict(str(target), "exists and is not a launch overlay; choose another --out")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        raise _not_writable(target, err) from None
    try:
        _write_tree(tmp, own, files)
        _move_into_place(tmp, target, source, own, files)
    except OSError as err:
        raise _not_writable(target, err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Overlay(target, source, reused=False, files=len(files))


def _move_into_place(tmp: Path, target: Path, source: Path, own: dict[str, bytes], files: dict[str, str]) -> None:
    try:
        os.rename(tmp, target)  # atomic; fails when target is a non-empty directory
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if _matches(target, source, own, files):
        return  # a concurrent run finished the same overlay first: adopt it
    # An older overlay of ours (other settings, or a source that gained files): swap it out.
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _matches(target, source, own, files):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def check_overlay(path: Path) -> None:
    """Raise StaleOverlay when links of an overlay no longer resolve (check before serving)."""
    missing = missing_links(Path(path))
    if missing:
        raise StaleOverlay(str(path), tuple(missing[:5]))


def check_target(target: Path, source: Path | None = None) -> Path:
    """Refuse, before anything is downloaded or written, a ``--out`` that ``build_overlay`` would
    refuse whatever it writes (``source`` None: not known yet, e.g. a repo id not downloaded)."""
    target = Path(target).expanduser()
    _check_target(target, source)
    try:
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise OverlayConflict(str(target), "exists and is not a directory; choose another --out")
        if target.is_dir() and any(target.iterdir()) and _provenance_of(target) is None:
            raise OverlayConflict(str(target), "exists and is not a launch overlay; choose another --out")
    except OSError as err:
        raise _not_writable(target, err) from None
    return target
