"""GPU memory through NVML, read with ctypes (no torch, no pynvml): free bytes per visible GPU.

Returns ``None`` where there is no NVIDIA driver (a laptop, CI): ``plan`` then needs
``--gpu-memory`` for the memory check.
"""

from __future__ import annotations

import ctypes
import os


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _visible(count: int) -> list[int]:
    """NVML indices of the GPUs CUDA will use. Entries that are not plain indices (GPU or MIG
    UUIDs) are not mapped: then all GPUs are read, which is what a memory check can still use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        return list(range(count))
    return [int(part) for part in parts if int(part) < count]


def free_memory() -> list[int] | None:
    """Free bytes of each visible GPU, or None when NVML is not available."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        free = []
        for index in _visible(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            memory = _Memory()
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
                free.append(int(memory.free))
        return free or None
    except (AttributeError, OSError):
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except (AttributeError, OSError):
            pass
