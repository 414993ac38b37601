"""A model directory's ``config.json``, read and checked before anything else (nothing is written)."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import LaunchError
from launcher.rules.configcheck import check_config
from launcher.runtime.paths import UnreadableFile, read_regular


class NotAModelDir(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "{path}: {problem}"


class MalformedConfig(LaunchError):
    path: str
    problem: str
    message = "{path} is not valid config JSON: {problem}. Re-download the checkpoint."


CONFIG = "config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # real config.json files are a few kB


def read_model_config(model_dir: Path) -> dict:
    """The parsed ``config.json`` of a model directory (NotAModelDir / MalformedConfig / BadConfig)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NotAModelDir(str(model_dir), "no such directory")
    path = model_dir / CONFIG
    if not path.is_file():
        raise NotAModelDir(str(model_dir), "has no config.json; is it a Hugging Face model directory?")
    try:  # never waited on (a FIFO swapped in after the check), never read past the limit
        data = read_regular(path, MAX_CONFIG_BYTES)
    except UnreadableFile as err:
        if err.problem.startswith("it is larger"):
            raise MalformedConfig(str(path), f"{err.problem}; a model config is a few kB") from None
        raise NotAModelDir(str(model_dir), f"cannot read config.json: {err.problem}") from None
    except OSError as err:
        raise NotAModelDir(str(model_dir), f"cannot read config.json: {err.strerror or err}") from None
    return parse_model_config(data, str(path))


def parse_model_config(data: bytes, origin: str) -> dict:
    """``config.json`` bytes -> a checked config dict (MalformedConfig / BadConfig naming ``origin``)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise MalformedConfig(origin, f"it is {len(data):,} bytes; a model config is a few kB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedConfig(origin, "not UTF-8 text") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedConfig(origin, f"{err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise MalformedConfig(origin, "it nests too deeply to be a model config") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise MalformedConfig(origin, str(err).split(";")[0]) from None
    if not isinstance(config, dict):
        raise MalformedConfig(origin, "the top level is not an object")
    return check_config(config, origin)
