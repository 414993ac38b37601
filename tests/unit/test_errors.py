"""Every error a user can see carries its own one-line message, and none is dead code."""

from __future__ import annotations

import importlib
import pkgutil
import re

import launcher
from launcher.errors import LaunchError
from tests.conftest import REPO


def _all_errors() -> list[type[LaunchError]]:
    for module in pkgutil.walk_packages(launcher.__path__, "launcher."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, todo = [], [LaunchError]
    while todo:
        for klass in todo.pop().__subclasses__():
            found.append(klass)
            todo.append(klass)
    return [k for k in found if not k.__name__.startswith("_")]


def test_every_error_class_carries_its_message():
    errors = _all_errors()
    assert len(errors) > 40
    assert [k.__name__ for k in errors if not (isinstance(k.message, str) or callable(k.message))] == []


def test_no_error_class_is_dead():
    source = "\n".join(p.read_text() for p in (REPO / "launcher").rglob("*.py"))
    dead = [k.__name__ for k in _all_errors()
            if len(re.findall(rf"\b{k.__name__}\b", source)) < 2]  # its definition, and a raise or an import
    assert dead == []
