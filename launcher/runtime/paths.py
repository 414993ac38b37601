"""Where launch keeps its own files (never inside a Hugging Face cache), where huggingface_hub keeps its
own, and the one way launch reads a file a user names (``read_regular``)."""

from __future__ import annotations

import errno
import os
import re
import stat
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


# --- the Hugging Face places: the one copy of huggingface_hub's rule (constants.py, 2.4) -----------
# Read exactly as huggingface_hub reads them at import, so launch's idea of its cache (which launch
# never writes into) is huggingface_hub's own: an empty value counts as set (huggingface_hub uses
# ``os.getenv(NAME, default)``), ``~`` is expanded before ``$VAR``, and the default of HF_HUB_CACHE is
# expanded twice, as there. tests/integration/hub/test_hf_cache_place.py compares the two.
HF_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")  # first set wins


def _hf_expand(text: str) -> str:
    return os.path.expandvars(os.path.expanduser(text))


def _hf_home_text() -> str:
    default_home = os.path.join(os.path.expanduser("~"), ".cache")
    return _hf_expand(os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", default_home), "huggingface")))


def hf_home() -> Path:
    """``HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``: huggingface_hub's
    ``constants.HF_HOME``, computed as it does without importing it."""
    return Path(_hf_home_text())


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else
    ``hf_home()/hub``; huggingface_hub's ``constants.HF_HUB_CACHE``."""
    legacy = os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(_hf_home_text(), "hub"))
    return Path(_hf_expand(os.getenv("HF_HUB_CACHE", legacy)))


def hf_cache_variable() -> str | None:
    """The variable that places the hub cache (the first of ``HF_CACHE_VARS`` set), None: ``HOME``."""
    named = [var for var in HF_CACHE_VARS if var in os.environ]
    return named[0] if named else None


def hf_token_path() -> Path:
    """The token file: ``HF_TOKEN_PATH``, else ``hf_home()/token`` (``constants.HF_TOKEN_PATH``)."""
    return Path(_hf_expand(os.getenv("HF_TOKEN_PATH", os.path.join(_hf_home_text(), "token"))))


# --- a file a user names ------------------------------------------------------------------------


class UnreadableFile(Exception):
    """A file a user named that ``read_regular`` will not or cannot read; ``problem`` says why in words
    ("it is a FIFO, not a regular file"). Callers turn it into their own one-line error."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:g} {unit}"
    return f"{count} bytes"


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path`` (links followed, as any reader would), at most
    ``max_bytes``: the one way launch reads a file a user names (an API key file, the token file).
    Opened without blocking and checked on the open descriptor, so a FIFO, a device, a socket or a
    directory is refused at once, never waited on, and a huge file is never read whole.
    ``UnreadableFile`` says why not; ``FileNotFoundError`` passes through."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno == errno.ENXIO:  # opening a socket
            raise UnreadableFile("it is a socket, not a regular file") from None
        raise UnreadableFile(err.strerror or str(err)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(f"it is {_kind(mode)}, not a regular file")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise UnreadableFile(f"it is larger than {_size(max_bytes)}")
        return b"".join(chunks)
    except OSError as err:
        raise UnreadableFile(err.strerror or str(err)) from None
    finally:
        os.close(fd)


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
