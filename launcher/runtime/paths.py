"""Where launch keeps its own files. Never inside a Hugging Face cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from launcher.errors import LaunchError


class RunDirNotWritable(LaunchError):
    path: str
    problem: str
    message = "cannot write the server's run files at {path}: {problem}. Set LAUNCH_CACHE_DIR to a writable place."


CACHE_ENV = "LAUNCH_CACHE_DIR"
PRESETS_ENV = "LAUNCH_PRESETS_DIR"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else Path.home() / fallback


def cache_dir() -> Path:
    """launch's own cache: ``$LAUNCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/launch`` (~/.cache/launch)."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else _xdg("XDG_CACHE_HOME", ".cache") / "launch"


def slug(name: str) -> str:
    """``name`` made safe (and short enough) as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:100].strip("-.") or "model"


def run_dir(name: str) -> Path:
    """launch's folder of one run (a server's log, the watchdog's record): ``<cache>/runs/NAME``. The
    one rule for run folders: ``serve`` names its run MODEL-PORT, ``proxy start`` proxy-PORT."""
    return cache_dir() / "runs" / slug(name)


def overlays_dir() -> Path:
    return cache_dir() / "overlays"


def user_presets_dirs() -> list[Path]:
    """The user's preset directories: ``$LAUNCH_PRESETS_DIR`` (several joined by ``os.pathsep``),
    else ``$XDG_CONFIG_HOME/launch/presets`` (~/.config/launch/presets)."""
    value = os.environ.get(PRESETS_ENV)
    if value:
        return [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return [_xdg("XDG_CONFIG_HOME", ".config") / "launch" / "presets"]


def builtin_presets_dir() -> Path:
    """The presets shipped with launch (``configs/`` in the source tree, packaged as
    ``launcher/configs`` in a wheel)."""
    package = Path(__file__).resolve().parents[1]  # launcher/
    for candidate in (package / "configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return package / "configs"


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(os.path.expandvars(value)).expanduser() if value else None


def hf_home() -> Path:
    """``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface`` (~/.cache/huggingface), as huggingface_hub
    computes it (variables in the value expanded), without importing it."""
    return _env_path("HF_HOME") or _xdg("XDG_CACHE_HOME", ".cache") / "huggingface"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``hf_home()/hub``."""
    return _env_path("HF_HUB_CACHE") or hf_home() / "hub"


DEFAULT_REVISION = "main"  # what the Hub, huggingface_hub and launch take when no revision is given
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def is_commit_sha(revision: str | None) -> bool:
    """A full 40-hex commit sha: immutable, so a complete cached copy needs no request."""
    return bool(revision) and bool(_SHA_RE.match(revision or ""))


def repo_folder(repo_id: str) -> str:
    """The cache folder name huggingface_hub uses for a model repo."""
    return "models--" + repo_id.replace("/", "--")


# The Hub's repo id rule, the one place it is written: ORG/NAME, each part letters, digits, "-",
# "_" or ".", at most 96 characters, not starting or ending with "-" or ".", no "--" or "..", no
# ".git" ending. Purely syntactic: callers check local paths and preset names first.
_REPO_PART = r"(?![.-])[\w.-]{1,96}(?<![.-])"
_REPO_ID_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$", re.ASCII)


def is_repo_id(text: object) -> bool:
    """``ORG/NAME`` as the Hub spells repo ids (``org/..``, ``../etc`` and ``a--b/c`` are not)."""
    return (
        isinstance(text, str)
        and bool(_REPO_ID_RE.match(text))
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def write_spec(directory: Path, name: str, data: dict) -> Path:
    """Write ``data`` as JSON to ``directory/name``, readable by this user only (a serving spec may
    hold API keys), replacing it atomically. ``RunDirNotWritable`` when the directory cannot be."""
    import json


    path = directory / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except OSError as err:
        raise RunDirNotWritable(str(directory), err.strerror or str(err)) from None
    return path


def read_spec(argv: list[str] | None, program: str) -> dict | None:
    """The spec ``write_spec`` wrote, for a serving process run as ``python -m PROGRAM SPEC.json``
    (``argv`` None: ``sys.argv[1:]``); None, after the usage line on stderr, unless given one path."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {program} SPEC.json", file=sys.stderr)
        return None
    return json.loads(Path(argv[0]).read_text(encoding="utf-8"))
