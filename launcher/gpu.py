"""The NVIDIA GPUs of this machine, read through NVML with ctypes (no torch, no pynvml, no lmdeploy):
whether one can serve at all, and the free bytes of each visible one.

Nothing here imports a heavy module or writes a file, so ``serve`` can ask before anything else and
refuse cleanly on a laptop or in CI. ``plan`` needs ``--gpu-memory`` there for the memory check.

Tests on a machine without a GPU that run ``serve`` against a stand-in engine replace
``nvidia_problem`` (``launcher.gpu.nvidia_problem = lambda: None``): that is the one seam.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

NVML_LIBRARY = "libnvidia-ml.so.1"


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NoNvml(Exception):
    """NVML is not usable; the message says why, for a user."""


def _visible(count: int) -> list[int]:
    """NVML indices of the GPUs CUDA will use. Entries that are not plain indices (GPU or MIG
    UUIDs) are not mapped: then all GPUs are read, which is what a memory check can still use. A
    negative first entry (``-1``) hides every GPU, as it does for CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    if parts and parts[0].startswith("-"):
        return []
    if not all(part.isascii() and part.isdigit() for part in parts):
        return list(range(count))
    return [int(part) for part in parts if int(part) < count]


@contextmanager
def _nvml() -> Iterator[tuple[ctypes.CDLL, list[int]]]:
    """NVML, initialised, and the indices of the visible GPUs; ``_NoNvml`` when it cannot be used."""
    try:
        nvml = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        raise _NoNvml(f"no NVIDIA driver was found ({NVML_LIBRARY} does not load)") from None
    try:
        code = nvml.nvmlInit_v2()
    except (AttributeError, OSError):
        raise _NoNvml(f"the NVIDIA driver's {NVML_LIBRARY} is not usable") from None
    if code != 0:
        raise _NoNvml(f"the NVIDIA driver does not answer (NVML error {code})")
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            raise _NoNvml("the NVIDIA driver sees no GPU")
        yield nvml, _visible(count.value)
    finally:
        try:
            nvml.nvmlShutdown()
        except (AttributeError, OSError):
            pass


def nvidia_problem() -> str | None:
    """Why no NVIDIA GPU can serve here (``None`` when one can): no driver, a driver that sees no
    GPU, or ``CUDA_VISIBLE_DEVICES`` hiding all of them. Cheap: loads the driver's NVML library only."""
    try:
        with _nvml() as (_, visible):
            if not visible:
                return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} hides every GPU"
    except _NoNvml as exc:
        return str(exc)
    except (AttributeError, OSError):
        return f"the NVIDIA driver's {NVML_LIBRARY} is not usable"
    return None


def free_memory() -> list[int] | None:
    """Free bytes of each visible GPU, or None when NVML is not available."""
    try:
        with _nvml() as (nvml, visible):
            free = []
            for index in visible:
                handle = ctypes.c_void_p()
                if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                    continue
                memory = _Memory()
                if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
                    free.append(int(memory.free))
            return free or None
    except (_NoNvml, AttributeError, OSError):
        return None
