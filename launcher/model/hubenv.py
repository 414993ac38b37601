"""The Hugging Face settings of the environment, read and checked before huggingface_hub is imported,
and the one rule that keeps their secrets out of what launch prints.

huggingface_hub parses some settings when it is imported and fails with a traceback on a bad value
(``int("1.5")`` for HF_HUB_DOWNLOAD_TIMEOUT; ``http://[::1`` or port 99999 in HF_ENDPOINT at the
first request). ``read`` checks each one launch or its README names, every value huggingface_hub
would choke on or read as something else, and raises ``BadHubSetting`` (one line, exit 2) before any
import, request or write. No network, no import of huggingface_hub.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from launcher.errors import LaunchError
from launcher.runtime.paths import (
    UnreadableFile,
    hf_cache_dir,
    hf_cache_variable,
    hf_token_path,
    read_regular,
)


class CacheNotADirectory(LaunchError):
    """The variable that places the cache (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME) or
    a folder above it is a file, so no cache can live there."""

    variable: str
    value: str
    file: str
    message = ("{variable} is {value}, but {file} is a file, not a directory, so the Hugging Face cache cannot "
               "be there. Point {variable} at a directory (or unset it).")


DEFAULT_ENDPOINT = "https://huggingface.co"
WEEK_S = 7 * 24 * 3600
TRUE, FALSE = ("1", "ON", "YES", "TRUE"), ("", "0", "OFF", "NO", "FALSE")  # huggingface_hub's true values
HIDDEN = "(value not shown)"


class BadHubSetting(LaunchError):
    """A Hugging Face setting huggingface_hub cannot use; ``shown`` is its value as it may be
    printed (quoted, a password or token taken out)."""

    variable: str
    shown: str
    must: str
    undo: str = "unset it"
    exit_code = 2
    message = "{variable} {shown} cannot be used: it must be {must}. Fix it or {undo}."


def _bad(variable: str, value: str, must: str) -> BadHubSetting:
    return BadHubSetting(variable, repr(redact(value)), must)


# --- secrets ---------------------------------------------------------------------------------

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#]*@")
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # the shape of Hugging Face access tokens
_BEARER = re.compile(r"\b(Bearer|Basic) [A-Za-z0-9._~+/=-]{12,}")  # an Authorization header's value
_SCHEME = re.compile(r"\s*[^:/@]*:?/*")  # what stands before a URL's user info, in any shape
_MIN_SECRET = 4  # shorter literal secrets are only taken out where they stand in a URL


def secrets() -> tuple[str, ...]:
    """The literal secrets of this environment: HF_ENDPOINT's user info (as written and decoded)
    and HF_TOKEN, longest first. (A token from the token file is taken out by its shape.)"""
    found = []
    head = (os.environ.get("HF_ENDPOINT") or "").rpartition("@")[0]
    userinfo = head[len(_SCHEME.match(head).group(0)):]  # type: ignore[union-attr]
    if userinfo and "/" not in userinfo:  # (else the "@" is in the path)
        password = userinfo.partition(":")[2]
        found += [userinfo, unquote(userinfo), password, unquote(password)]
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        found.append((os.environ.get(var) or "").strip())
    return tuple(sorted({s for s in found if len(s) >= _MIN_SECRET}, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` without the user info of any URL, HF_ENDPOINT's password, a token or an
    Authorization value: what a message that can carry a hub URL is passed through."""
    for secret in secrets():
        text = text.replace(secret, "***")
    text = _USERINFO.sub(r"\1***@", text)
    return _BEARER.sub(r"\1 ***", _TOKEN.sub("hf_***", text))


def scrub(err: LaunchError) -> LaunchError:
    """``err`` with each of its facts passed through ``redact`` (``err`` itself when none changes)."""
    def clean(value: object) -> object:
        return redact(value) if isinstance(value, str) else \
            tuple(clean(v) for v in value) if isinstance(value, tuple) else value

    facts = {name: clean(value) for name, value in err.facts().items()}
    return err if facts == err.facts() else type(err)(**facts)


class Redacted(Exception):
    """The traceback of an error, secrets taken out: the cause a scrubbed error is raised from."""

    def __init__(self, err: BaseException) -> None:
        import traceback

        super().__init__(redact("".join(traceback.format_exception(err)).rstrip()))


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def redact_logs(logger: logging.Logger) -> None:
    """Every handler of ``logger`` redacts what it prints from now on (huggingface_hub logs the URLs
    it retries: ``HTTP Error 500 thrown while requesting HEAD URL``)."""
    for handler in logger.handlers:
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())


# --- the settings ----------------------------------------------------------------------------

_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_URL_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
_ENDPOINT_MUST = "the http:// or https:// URL of a Hugging Face Hub or mirror, such as https://hf-mirror.com"


def _endpoint(value: str) -> str:
    """HF_ENDPOINT without its trailing ``/``: a URL huggingface_hub and its HTTP client take as the
    same host and port, and under which launch can add ``/api/...`` paths."""
    scheme, sep, rest = value.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, _, hostport = authority.rpartition("@")
    bracketed = hostport.startswith("[")
    if bracketed:
        host, close, port = hostport[1:].partition("]")
    else:
        host, close, port = hostport.split(":")[0], "", hostport[len(hostport.split(":")[0]):]
    problem = None
    if not value.isascii() or not value.isprintable() or " " in value:
        problem = "it has blanks, control or non-ASCII characters (an IDN host is written in its xn-- form)"
    elif not sep or scheme.lower() not in ("http", "https"):
        problem = "it does not start with http:// or https://"
    elif "?" in value or "#" in value:
        problem = "it has a query or fragment (launch adds paths after it)"
    elif "@" in userinfo or not _URL_CHARS.fullmatch(userinfo) or not _URL_CHARS.fullmatch(path):
        problem = "its user info or path has characters a URL must percent-encode"
    elif bracketed and not close:
        problem = "its IPv6 address has no closing ]"
    elif bracketed and ("%" in host or not _is_ip(host, ipaddress.IPv6Address)):
        problem = f"[{host}] is not an IPv6 address (without a zone)"
    elif not bracketed and not (host and _HOST.fullmatch(host) and len(host) <= 253):
        problem = f"{host!r} is not a host name or IP address" if host else "it names no host"
    elif not bracketed and re.fullmatch(r"[0-9.]+", host) and not _is_ip(host.rstrip("."),
                                                                        ipaddress.IPv4Address):
        problem = f"{host} is not an IPv4 address"
    elif port and not (re.fullmatch(r":[0-9]{1,5}", port) and 1 <= int(port[1:]) <= 65535):
        problem = f"its port {port.removeprefix(':')!r} is not a number from 1 to 65535"
    if problem is not None:  # shown without anything before its last "@", whatever its shape
        head, at, tail = value.rpartition("@")
        shown = _SCHEME.match(head).group(0) + "***@" + tail if at else value  # type: ignore[union-attr]
        raise _bad("HF_ENDPOINT", shown, f"{_ENDPOINT_MUST} ({problem})")
    return f"{scheme.lower()}://{authority}{slash}{path}".rstrip("/")


def _is_ip(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _seconds(var: str) -> int | None:
    """HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT: huggingface_hub takes ``int(value)``."""
    value = os.environ.get(var)
    if value is None:
        return None
    text = value.strip(" \t\r\n")  # ASCII blanks only: "1\xa0" is no number launch reads (int() would)
    if not re.fullmatch(r"\+?[0-9]{1,7}", text, re.ASCII) or not 1 <= int(text) <= WEEK_S:
        raise _bad(var, value, f"a whole number of seconds from 1 to {WEEK_S:,} (huggingface_hub reads it "
                   "with int())")
    return int(text)


def _flag(var: str) -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: one of huggingface_hub's true values, or a false one."""
    value = os.environ.get(var)
    text = (value or "").strip().upper()
    if text not in TRUE + FALSE:
        raise _bad(var, value or "", "1 (or true, yes, on) to stay offline, or 0 (or false, no, off)")
    return text in TRUE


def _token(text: str | None, variable: str, undo: str = "unset it") -> str | None:
    """A token as huggingface_hub cleans it: it goes into an HTTP header, so visible ASCII only."""
    token = (text or "").replace("\r", "").replace("\n", "").strip()
    if token and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise BadHubSetting(variable, HIDDEN, "a token of visible ASCII characters, as https://huggingface.co/"
                            "settings/tokens shows it", undo)
    return token or None


MAX_TOKEN_FILE_BYTES = 64 * 1024  # a token is under a hundred bytes


def _token_file() -> str | None:
    """The token huggingface_hub reads from HF_TOKEN_PATH (default HF_HOME/token) without HF_TOKEN: a
    regular file, read without waiting on it (``paths.read_regular``)."""
    path = hf_token_path()
    where, undo = ("HF_TOKEN_PATH", "unset it") if "HF_TOKEN_PATH" in os.environ else \
        ("the token file", "remove it (hf auth logout)")
    try:
        return _token(read_regular(path, MAX_TOKEN_FILE_BYTES).decode("utf-8"), f"{where} {str(path)!r}", undo)
    except FileNotFoundError:
        return None
    except UnreadableFile as err:
        raise BadHubSetting(where, repr(str(path)), f"a regular file holding a token ({err.problem})", undo) from None
    except UnicodeDecodeError:
        raise BadHubSetting(f"{where} {str(path)!r}", HIDDEN, "UTF-8 text holding a token", undo) from None


@dataclass(frozen=True)
class HubSettings:
    endpoint: str  # what requests go to: may carry user info (shown only through ``redact``)
    offline: bool
    cache_dir: Path
    etag_timeout: int | None  # None: huggingface_hub's own default
    download_timeout: int | None
    token: str | None  # the one huggingface_hub sends (HF_TOKEN, else the token file)


def existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


# huggingface_hub takes "" (or blanks) as a path in the current folder: refused by name. XDG_CACHE_HOME
# only where huggingface_hub reads it (HF_HOME unset): it is not theirs alone.
_PATH_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH")


def _cache() -> Path:
    """The hub cache, placed by ``paths.hf_cache_dir`` (the one copy of huggingface_hub's rule)."""
    named = _PATH_VARS + (() if "HF_HOME" in os.environ else ("XDG_CACHE_HOME",))
    for var in named:
        if (value := os.environ.get(var)) is not None and not value.strip():
            raise _bad(var, value, "a path, not blank (huggingface_hub would look in the current folder)")
    cache = hf_cache_dir()
    if not existing(cache).is_dir():  # the variable that placed it, or a folder above, is a file
        var = hf_cache_variable() or "HOME"
        raise CacheNotADirectory(var, os.environ.get(var, "~"), str(existing(cache)))
    return cache


def read() -> HubSettings:
    """Every Hugging Face setting of the environment, checked (``BadHubSetting``, ``CacheNotADirectory``)."""
    endpoint = _endpoint(os.environ["HF_ENDPOINT"]) if (os.environ.get("HF_ENDPOINT") or "").strip() \
        else DEFAULT_ENDPOINT
    offline = _flag("HF_HUB_OFFLINE") | _flag("TRANSFORMERS_OFFLINE")
    etag, download = _seconds("HF_HUB_ETAG_TIMEOUT"), _seconds("HF_HUB_DOWNLOAD_TIMEOUT")
    token = _token(os.environ.get("HF_TOKEN"), "HF_TOKEN") or _token(os.environ.get("HUGGING_FACE_HUB_TOKEN"),
                                                                     "HUGGING_FACE_HUB_TOKEN")
    cache = _cache()
    return HubSettings(endpoint, offline, cache, etag, download, token or _token_file())


__all__ = ["BadHubSetting", "HubSettings", "Redacted", "existing", "read", "redact", "redact_logs", "scrub"]
