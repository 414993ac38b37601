"""``--out``: a place where launch may make a new directory (an overlay; a probe or ppl run), checked as
text before anything is written, and the one place launch never writes (the Hugging Face cache)."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from launcher.errors import LaunchError
from launcher.runtime.paths import hf_cache_dir

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
# The temporary names beside the target add ".", ".tmp-<pid>-<8 hex>" / ".old-<8 hex>".
_TMP_SUFFIX = 40
PATH_MAX = 4000


class BadOutPath(LaunchError):
    """An --out that cannot name an overlay directory (empty, too long, control characters)."""

    path: str
    problem: str
    exit_code = 2
    message = "--out {path}: {problem}"



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


def inside(path: Path, parent: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(parent))
        return True
    except ValueError:
        return False


def inside_hf_cache(path: Path) -> bool:
    """``path`` (links resolved) is in the Hugging Face cache, where launch never writes."""
    return inside(path, hf_cache_dir())
