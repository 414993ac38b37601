"""The texts ``launch ppl`` scores: files the user gives, or the bundled default.

The default is an excerpt of the Jargon File 4.4.7 (public domain; source and licence in
``data/SOURCE.md`` beside it): about 89,000 characters, 20,000 tokens of a Llama-style tokenizer,
enough for windows of 2x an 8,192-token native context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LaunchError


class PplBadText(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "--text {path}: {problem}"


DEFAULT_TEXT_NAME = "jargon-file-4.4.7-excerpt.txt"
DEFAULT_TEXT_LABEL = "bundled: Jargon File 4.4.7 excerpt (public domain)"
MAX_TEXT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Text:
    source: str  # the path as given, or the bundled text's label
    content: str


def default_text_path() -> Path:
    return Path(__file__).parent / "data" / DEFAULT_TEXT_NAME


def load_texts(paths: tuple[Path, ...]) -> list[Text]:
    """The given files (UTF-8, not empty, at most 64 MiB), or the bundled text."""
    if not paths:
        return [Text(DEFAULT_TEXT_LABEL, default_text_path().read_text(encoding="utf-8"))]
    from launcher.runtime.paths import UnreadableFile, read_regular

    texts = []
    for path in paths:
        try:  # a FIFO or a device is refused, never waited on
            content = read_regular(path, MAX_TEXT_BYTES).decode("utf-8")
        except UnicodeDecodeError as err:
            raise PplBadText(str(path), f"not UTF-8 text (byte {err.start})") from None
        except FileNotFoundError:
            raise PplBadText(str(path), "no such file") from None
        except UnreadableFile as err:
            raise PplBadText(str(path), f"cannot read it: {err.problem}") from None
        if not content.strip():
            raise PplBadText(str(path), "the file is empty")
        texts.append(Text(str(path), content))
    return texts


def serve_ppl_text(path: Path | None, probe: bool) -> Path | None:
    """``serve --ppl-text``: needs ``--probe`` and a file, checked before anything starts."""
    from launcher.rules.checks import BadOption

    if path is None:
        return None
    if not probe:
        raise BadOption("--ppl-text", str(path), "it measures once the server is ready: add --probe")
    if not path.is_file():
        raise BadOption("--ppl-text", str(path), "not a file; give a UTF-8 text file")
    return path
