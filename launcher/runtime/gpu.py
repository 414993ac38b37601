"""The NVIDIA GPUs of this machine, read through NVML with ctypes (no torch, no pynvml, no lmdeploy):
whether one can serve at all, and the free bytes of each visible one.

Nothing here imports a heavy module or writes a file, so ``serve`` can ask before anything else and
refuse cleanly on a laptop or in CI. ``plan`` needs ``--gpu-memory`` there for the memory check.

Tests on a machine without a GPU that run ``serve`` against a stand-in engine replace
``nvidia_problem`` (``launcher.runtime.gpu.nvidia_problem = lambda: None``): that is the one seam.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

NVML_LIBRARY = "libnvidia-ml.so.1"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"
_INDEX = re.compile(r"[0-9]+", re.ASCII)
_UUID = re.compile(r"(?:GPU|MIG)-[0-9A-Za-z/_-]+", re.ASCII)  # GPU-<uuid>, MIG-<uuid>, MIG-GPU-<uuid>/gi/ci


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NoNvml(Exception):
    """NVML is not usable; the message says why, for a user."""


@dataclass(frozen=True)
class Visible:
    """The GPUs CUDA enumerates here, read from ``CUDA_VISIBLE_DEVICES`` the way CUDA reads it.

    ``ids``: in CUDA's order, each as a replica's ``CUDA_VISIBLE_DEVICES`` entry names it (an index
    in plain decimal, or a ``GPU-`` / ``MIG-`` UUID as given); ``None`` when the variable is unset
    and the GPU count is not known (planning without a GPU). ``stopped_at``: the entry where CUDA
    stops enumerating (not an index of a GPU here, not a UUID, empty); it and what follows are ignored."""

    value: str | None  # the variable as set; None: unset
    ids: tuple[str, ...] | None
    stopped_at: str | None = None

    def note(self) -> str | None:
        """One line about the ignored entries, or None."""
        if self.stopped_at is None:
            return None
        if not self.ids:
            return f"{CUDA_ENV}={self.value!r} hides every GPU from CUDA (it stops at its first entry)"
        kept = ",".join(self.ids or ()) or "no GPU"
        return (f"{CUDA_ENV}={self.value!r}: CUDA stops at the entry {self.stopped_at!r}, so it sees {kept}; "
                "entries after it are ignored")


def visible(environ: Mapping[str, str] | None = None, gpu_count: int | None = None) -> Visible:
    """The one reader of ``CUDA_VISIBLE_DEVICES`` (layout, serve, NVML): a comma-separated list read
    as CUDA reads it. Unset: every GPU, ``0 .. gpu_count-1`` (``ids`` None when the count is not
    known). Set: entries are GPU indices (ASCII digits, below ``gpu_count`` when it is known) or
    ``GPU-`` / ``MIG-`` UUIDs; enumeration stops at the first entry that is neither (``-1``, ``junk``,
    an empty entry), so an empty value means no GPU. A GPU named twice before that point is refused
    (``BadOption``): CUDA would not give it twice, and two replicas would share it."""
    from launcher.rules.checks import BadOption

    value = (os.environ if environ is None else environ).get(CUDA_ENV)
    if value is None:
        return Visible(None, None if gpu_count is None else tuple(str(i) for i in range(gpu_count)))
    ids: list[str] = []
    seen: dict[str, str] = {}
    for raw in value.split(","):
        entry = raw.strip()
        if _INDEX.fullmatch(entry) and (gpu_count is None or int(entry) < gpu_count):
            entry, key = str(int(entry)), str(int(entry))
        elif _UUID.fullmatch(entry):
            key = entry.lower()
        else:
            return Visible(value, tuple(ids), raw)
        if key in seen:
            shown = value if len(value) <= 80 else value[:79] + "…"
            raise BadOption(CUDA_ENV, shown, f"names GPU {entry} twice ({seen[key]!r} and {raw!r}); CUDA would "
                            "not give it twice: list each GPU once, e.g. CUDA_VISIBLE_DEVICES=0,1")
        seen[key] = raw
        ids.append(entry)
    return Visible(value, tuple(ids))


def _handles(nvml: ctypes.CDLL, count: int) -> list[ctypes.c_void_p]:
    """NVML handles of the GPUs CUDA will use, in its order: indices directly, ``GPU-`` UUIDs (or a
    unique prefix of one, as CUDA takes them) by the UUIDs NVML reports, ``MIG-`` UUIDs through
    NVML's own lookup. An id NVML does not know ends the list there, as it ends CUDA's."""
    ids = visible(gpu_count=count).ids or ()
    uuids: dict[int, str] = {}
    if any(not _INDEX.fullmatch(i) for i in ids):
        for index in range(count):
            handle, buffer = ctypes.c_void_p(), ctypes.create_string_buffer(96)
            if (nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) == 0
                    and nvml.nvmlDeviceGetUUID(handle, buffer, 96) == 0):
                uuids[index] = buffer.value.decode("ascii", "replace").lower()
    out = []
    for entry in ids:
        handle = ctypes.c_void_p()
        if _INDEX.fullmatch(entry):
            code = nvml.nvmlDeviceGetHandleByIndex_v2(int(entry), ctypes.byref(handle))
        elif entry.upper().startswith("GPU-"):
            matches = [i for i, uuid in uuids.items() if uuid.startswith(entry.lower())]
            code = nvml.nvmlDeviceGetHandleByIndex_v2(matches[0], ctypes.byref(handle)) if len(matches) == 1 else 1
        else:
            code = nvml.nvmlDeviceGetHandleByUUID(entry.encode("ascii"), ctypes.byref(handle))
        if code != 0:
            break
        out.append(handle)
    return out


@contextmanager
def _nvml() -> Iterator[tuple[ctypes.CDLL, list[ctypes.c_void_p]]]:
    """NVML, initialised, and the handles of the visible GPUs; ``_NoNvml`` when it cannot be used."""
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
        yield nvml, _handles(nvml, count.value)
    finally:
        try:
            nvml.nvmlShutdown()
        except (AttributeError, OSError):
            pass


def nvidia_problem() -> str | None:
    """Why no NVIDIA GPU can serve here (``None`` when one can): no driver, a driver that sees no
    GPU, or ``CUDA_VISIBLE_DEVICES`` hiding all of them. Cheap: loads the driver's NVML library only."""
    try:
        with _nvml() as (_, handles):
            if not handles:
                return f"{CUDA_ENV}={os.environ.get(CUDA_ENV, '')!r} hides every GPU (CUDA stops at its first entry)"
    except _NoNvml as exc:
        return str(exc)
    except (AttributeError, OSError):
        return f"the NVIDIA driver's {NVML_LIBRARY} is not usable"
    return None


def count(free: list[int] | None) -> int | None:
    """The GPUs CUDA will give a server here: NVML's count of the visible ones (``free``, from
    ``free_memory``), else what ``CUDA_VISIBLE_DEVICES`` lists when it is set (read as CUDA reads it),
    else unknown (None: planning without a GPU)."""
    if free:
        return len(free)
    seen = visible()
    return None if seen.ids is None else len(seen.ids)


def free_memory() -> list[int] | None:
    """Free bytes of each visible GPU, or None when NVML is not available."""
    try:
        with _nvml() as (nvml, handles):
            free = []
            for handle in handles:
                memory = _Memory()
                if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
                    free.append(int(memory.free))
            return free or None
    except (_NoNvml, AttributeError, OSError):
        return None
