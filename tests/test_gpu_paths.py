"""Small edges: which GPUs NVML is asked about, and where the Hugging Face cache is."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.gpu import _visible, free_memory
from launcher.paths import hf_cache_dir, hf_home


@pytest.mark.parametrize("value, expected", [
    (None, [0, 1, 2, 3]), ("2,0", [2, 0]), ("1,7", [1]), ("", []),
    ("GPU-8a4c1f2e-0000-0000-0000-000000000000", [0, 1, 2, 3]),  # UUIDs: read all
    ("MIG-1b2c3d4e-0000-0000-0000-000000000000,0", [0, 1, 2, 3]),
])
def test_cuda_visible_devices(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert _visible(4) == expected


def test_no_nvml_here_means_no_reading():
    if Path("/dev/nvidiactl").exists():
        pytest.skip("a GPU machine")
    assert free_memory() is None


def test_hf_paths_follow_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$SCRATCH/hf")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hf_home() == tmp_path / "hf" and hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
