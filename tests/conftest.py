"""Shared test fixtures. Every test runs with its own HOME, caches and preset directory, so nothing
a test does reaches the user's real Hugging Face cache or launch's own cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run (`make test` on any machine, CI included, passes or
# fails alike); LAUNCH_HYPOTHESIS_RANDOM=1 draws new ones each run, to search further.
settings.register_profile("launch", derandomize=not os.environ.get("LAUNCH_HYPOTHESIS_RANDOM"))
settings.load_profile("launch")

# Tests send Ctrl-C (SIGINT) to the processes they start. A shell that starts the suite in the background
# (`make test &`) hands it SIGINT ignored, and an ignored signal stays ignored across exec: every process a
# test starts would then ignore Ctrl-C too. With a handler here, exec resets it to the default instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A small Llama config.json (native context 256), for model directories the tests make.
# InternVL whose language model is Qwen2: its own InternVLChatConfig (auto_map at the top, remote code)
# builds llm_config with transformers' Qwen2Config.
INTERNVL_QWEN2 = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rope_scaling": None, "num_hidden_layers": 2, "hidden_size": 256,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                   "torch_dtype": "bfloat16"},
    "vision_config": {"hidden_size": 64}, "torch_dtype": "bfloat16",
}

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "torch_dtype": "float16",
}


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


def user_presets(tmp_path: Path, monkeypatch, **texts: str) -> Path:
    """``tmp_path/presets`` holding ``NAME.yaml`` with each text, made launch's user preset
    directory ($LAUNCH_PRESETS_DIR) for this test."""
    presets = tmp_path / "presets"
    presets.mkdir()
    for name, text in texts.items():
        (presets / f"{name}.yaml").write_text(text)
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(presets))
    return presets


@contextmanager
def killed_if_running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc`` for the block; killed on the way out if still running, so a failed step leaves no
    process behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


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


def tree_state(root: Path) -> dict[str, str] | None:
    """A byte-for-byte picture of everything under ``root`` (links not followed): each directory,
    each file's SHA-256 and each link's target; None when ``root`` does not exist."""
    import hashlib

    if not Path(root).exists():
        return None
    state = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                state[rel] = "link:" + os.readlink(full)
            elif full.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return state


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    from launcher.runtime.address import free_ports

    return free_ports(1)


def assert_one_line_error(result, *needles: str, code: int | None = None) -> None:
    """launch's contract for bad input: non-zero exit, one `launch: error:` line on stderr naming
    the problem, no traceback, nothing on stdout."""
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("launch: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert result.stdout == ""


def cache_mismatches(endpoint: str, repo_id: str, revision: str | None = None) -> list[dict]:
    """huggingface_hub's own integrity check of the cached snapshot of ``repo_id`` against the hub at
    ``endpoint`` (``HfApi.verify_repo_checksums``: each file hashed, sha256 for LFS files, git blob
    sha1 otherwise, and compared with the hub's listing), plus a ``"link"`` entry for each snapshot
    entry that is no readable file (a dangling link), which that check passes over. [] is pristine."""
    from huggingface_hub import HfApi

    from launcher.runtime.paths import hf_cache_dir

    api = HfApi(endpoint=endpoint)
    checked = api.verify_repo_checksums(repo_id, revision=revision, cache_dir=hf_cache_dir())
    root = checked.verified_path
    dangling = [{"path": str(p.relative_to(root)), "expected": "a file", "actual": "missing",
                 "algorithm": "link"} for p in sorted(root.rglob("*")) if p.is_symlink() and not p.is_file()]
    return [*checked.mismatches, *dangling]


@pytest.fixture
def hub(monkeypatch):
    """A fake Hugging Face Hub (tests/support/fakehub.py, a real HTTP server on 127.0.0.1) serving org/tiny;
    HF_ENDPOINT points at it for this test."""
    from tests.support.fakehub import FakeHub, tiny_repo_files

    with FakeHub() as server:
        server.add_repo("org/tiny", tiny_repo_files())
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def model_dir(tmp_path):
    """A local model directory ``tiny``: LLAMA's config.json and a (fake) safetensors file."""
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    return d
