"""API keys for the served OpenAI endpoint: gathered from flags, an environment variable and a file.

lmdeploy's ``serve(api_keys=...)`` iterates what it is given. A plain string is iterated character
by character, so every single character of it becomes a valid key. That is why this module only
ever returns a ``list`` (or ``None`` for "no keys"), and why it refuses a string where it expects a
list of flags. Keys travel in an HTTP header that the server reads as Latin-1 and lmdeploy hashes
as UTF-8, so only printable ASCII without spaces works reliably; anything else is refused here
rather than producing a key that can never match.

Error messages name where a bad key came from (flag number, entry number, file line), never the
key itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from launcher.errors import LaunchError
from launcher.runtime.paths import UnreadableFile, read_regular


class BadApiKey(LaunchError):
    source: str  # where the key came from: "--api-key #2", "LAUNCH_API_KEYS entry 3", "keys.txt line 4"
    problem: str
    exit_code = 2
    message = ("API key {source} {problem}. A key is one word of printable ASCII without spaces, "
               "e.g. from `openssl rand -hex 24`.")


class ApiKeyFileError(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "cannot read API keys from {path}: {problem}. Give a file with one key per line."


DEFAULT_ENV_VAR = "LAUNCH_API_KEYS"
MAX_KEY_FILE_BYTES = 1 << 20  # a key is a few dozen bytes: room for thousands, and never a whole disk read


def check_api_key(key: str, source: str) -> str:
    """Return ``key`` if it can work as a bearer token; raise ``BadApiKey`` naming ``source``."""
    if not isinstance(key, str):
        raise TypeError(f"an API key must be a str, got {type(key).__name__}")
    if key == "":
        raise BadApiKey(source, "is empty")
    if any(ch.isspace() for ch in key):
        raise BadApiKey(source, "contains whitespace")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in key):
        raise BadApiKey(source, "contains characters outside printable ASCII")
    return key


def keys_from_env(env_var: str = DEFAULT_ENV_VAR, environ: Mapping[str, str] | None = None) -> list[str]:
    """Comma-separated keys from ``env_var``; spaces around commas are ignored. Unset or empty: none."""
    value = (os.environ if environ is None else environ).get(env_var, "")
    if value.strip() == "":
        return []
    return [check_api_key(part.strip(), f"{env_var} entry {i}") for i, part in enumerate(value.split(","), 1)]


def keys_from_file(path: Path | str) -> list[str]:
    """One key per line; blank lines and lines starting with ``#`` are skipped. The file must be a
    regular file of at most ``MAX_KEY_FILE_BYTES`` (``paths.read_regular``: a FIFO is refused, not waited on).

    A file that holds no key at all is an error: the user asked for keys, and serving without any
    would silently leave the endpoint open.
    """
    path = Path(os.path.expanduser(path))  # (Path.expanduser raises on "~nosuchuser")
    try:
        text = read_regular(path, MAX_KEY_FILE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ApiKeyFileError(str(path), "no such file") from None
    except UnreadableFile as err:  # a FIFO, device, socket or directory, too large, no permission
        raise ApiKeyFileError(str(path), err.problem) from None
    except UnicodeDecodeError:
        raise ApiKeyFileError(str(path), "it is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keys.append(check_api_key(stripped, f"{path.name} line {number}"))
    if not keys:
        raise ApiKeyFileError(str(path), "it holds no key (only blank lines or # comments)")
    return keys


def _merge(groups: Iterable[list[str]]) -> list[str]:
    seen: set[str] = set()
    merged = []
    for group in groups:
        for key in group:
            if key not in seen:
                seen.add(key)
                merged.append(key)
    return merged


def resolve_api_keys(
    flag_keys: Sequence[str] | None = None,
    env_var: str = DEFAULT_ENV_VAR,
    key_file: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[str] | None:
    """All API keys the server should accept, or ``None`` when none was given anywhere.

    Order: ``--api-key`` flags (in the order given), then ``env_var`` (comma separated), then
    ``key_file`` (one per line); duplicates keep their first place. The result is always a new
    ``list`` of ``str`` (never a string: see the module docstring). ``environ`` replaces
    ``os.environ`` (for tests).
    """
    if isinstance(flag_keys, (str, bytes)):
        raise TypeError("flag_keys must be a list of keys, not one string (it would split into characters)")
    from_flags = [check_api_key(key, f"--api-key #{i}") for i, key in enumerate(flag_keys or (), 1)]
    from_env = keys_from_env(env_var, environ)
    from_file = keys_from_file(key_file) if key_file is not None else []
    merged = _merge([from_flags, from_env, from_file])
    return merged or None
