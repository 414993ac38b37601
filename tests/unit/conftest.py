"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from tests.support.servers import Scripted


@pytest.fixture(scope="module")
def _scripted_server():
    with Scripted() as server:
        yield server


@pytest.fixture
def scripted(_scripted_server):
    """A ``Scripted`` server on 127.0.0.1 (one per test module), with no replies and nothing seen."""
    _scripted_server.replies.clear()
    _scripted_server.seen.clear()
    return _scripted_server
