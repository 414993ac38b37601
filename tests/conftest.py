"""Shared test fixtures. Every test runs with its own HOME, caches and preset directory, so nothing
a test does reaches the user's real Hugging Face cache or launch's own cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for var in ("LAUNCH_CACHE_DIR", "LAUNCH_PRESETS_DIR", "LAUNCH_DEBUG", "HF_TOKEN", "HF_HUB_OFFLINE",
                "HF_ENDPOINT", "HF_HUB_CACHE", "LAUNCH_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    return home


def run_launch(*args: str, env: dict | None = None, timeout: float = 120, cwd: str | None = None):
    """Run the real ``launch`` entry point in a fresh interpreter (a real subprocess)."""
    import subprocess

    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def launch():
    return run_launch
