"""The base of launch's typed errors, and the one rule that turns an error into what a user sees.

Every error a user can cause is a subclass of ``LaunchError`` defined beside the code that raises it
(``launcher.rules.rope.ShrinksContext``, ``launcher.model.hubcall.RepoNotFound``, ...), with its facts as
annotated fields and its ``message`` beside them (a format string over those fields, or a method) that
says what is wrong and what to do next. Library code raises them and never prints. The one edge,
``launcher.cli.main``, prints ``user_message(err)`` on stderr and exits with the error's
``exit_code``; ``LAUNCH_DEBUG=1`` shows the traceback as well. Every fact is shown printable
(``printable``), whatever a server, a file or a file name put in it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

DEBUG_ENV = "LAUNCH_DEBUG"


class LaunchError(Exception):
    """A failure the user can fix. ``str(err)`` is the one-line message.

    A subclass declares its facts as annotated class attributes (a value is the default), like a
    dataclass; they become the constructor's parameters, in order, after the inherited ones. (Not
    ``@dataclass``: generating ~60 classes' methods at import costs start-up time of every command.)
    """

    exit_code = 1
    _fields: tuple[str, ...] = ()
    # The one line the user sees: a format string over the facts (``{name_list}`` joins a tuple), or
    # a method ``def message(self) -> str``. Declared without an annotation (annotations are facts).
    message = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [name for name in inspect.get_annotations(cls) if not name.startswith("_") and name != "exit_code"]
        cls._fields = tuple(dict.fromkeys([*cls._fields, *own]))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} facts, got {len(args)}")
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated fact {name!r}")
            values[name] = value
        for name in names:
            if name not in values:
                if not hasattr(type(self), name):
                    raise TypeError(f"{type(self).__name__} needs the fact {name!r}")
                values[name] = getattr(type(self), name)
            setattr(self, name, values[name])
        super().__init__(*(values[name] for name in names))

    def facts(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.facts() == self.facts()  # type: ignore[attr-defined]

    __hash__ = Exception.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.facts().items())})"

    def __str__(self) -> str:
        return user_message(self)


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a path, an escape sequence) and lone
    surrogates (a file name that is not UTF-8) written as escapes, so that it stays one line,
    cannot drive the terminal and can be written to any stream."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class _Fact(str):
    """A text fact as a message shows it: printable (``printable``); ``{fact!r}`` is ``repr`` of
    the text as given (which escapes the same characters)."""

    given: str

    def __repr__(self) -> str:
        return repr(self.given)


def _shown_fact(value: Any) -> Any:
    """A fact as every message shows it: text (a path included) printable, in tuples and lists too."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, _Fact) or not isinstance(value, str):
        return value if not isinstance(value, (tuple, list)) else type(value)(_shown_fact(v) for v in value)
    fact = _Fact(printable(value))
    fact.given = value
    return fact


class _Shown:
    """``err`` as its ``message`` method reads it: each fact through ``_shown_fact``."""

    def __init__(self, err: LaunchError) -> None:
        self._err = err

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._err, name)
        return _shown_fact(value) if name in self._err._fields else value


def _format(template: str, err: LaunchError) -> str:
    facts = {key: _shown_fact(value) for key, value in err.facts().items()}
    for key, value in list(facts.items()):
        if isinstance(value, (tuple, list)):
            facts[f"{key}_list"] = ", ".join(str(v) for v in value)
    return template.format(**facts)


def user_message(err: LaunchError) -> str:
    """What a user sees for ``err``: its class's ``message``, a format string over its facts
    (``{name_list}`` joins a tuple) or a method. Every fact is shown printable, whatever a server,
    a file or a file name put in it: the message's lines are the template's own (one, except a
    server log's tail), and no fact can add a line or drive the terminal."""
    own = type(err).message
    if callable(own):
        return own(_Shown(err))
    if isinstance(own, str):
        return _format(own, err)
    return type(err).__name__
