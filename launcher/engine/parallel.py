"""lmdeploy's own parallel-config check, as TurboMind runs it before it loads a weight.

``derive_parallel_config`` (``lmdeploy/turbomind/parallel_config.py``, pure standard library) is loaded
from the installed lmdeploy by file, so that ``plan`` imports neither lmdeploy's package nor torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from launcher.errors import LaunchError


class LayoutRefused(LaunchError):
    """lmdeploy's own parallel-config function refuses the layout."""

    tp: int
    nnodes: int
    gpus_per_node: int
    reason: str
    message = (
        "TurboMind cannot run --tp {tp} on {nnodes} node(s) with {gpus_per_node} GPU(s) each: {reason}. "
        "Every node needs tp / nnodes GPUs; use a tp that is nnodes x the GPUs of one node."
    )


class ContextParallelRefused(LaunchError):
    """``--cp`` that TurboMind cannot run with this tp (lmdeploy's own function, or its kernels' sizes)."""

    cp: int
    tp: int
    reason: str
    exit_code = 2
    message = "--cp '{cp}' with --tp {tp}: {reason}"


# The context-parallel sizes TurboMind's all-reduce kernels are built for (src/turbomind/kernels/.../reduce.cu,
# read at lmdeploy's main of 2026-08-21): another size passes the Python check and fails in the engine.
CP_SIZES = (1, 2, 4, 8, 16, 32)


class LayoutUncheckable(LaunchError):
    reason: str
    message = "cannot check the layout with lmdeploy's own parallel-config function: {reason}. Run `make install`."


_derive: Callable | None = None


def lmdeploy_derive_parallel_config() -> Callable:
    """``derive_parallel_config`` of the installed lmdeploy (``turbomind/parallel_config.py``).

    Loaded from its file as a private module: importing ``lmdeploy.turbomind`` would import torch
    (seconds), and the file itself imports only the standard library."""
    global _derive
    if _derive is None:
        spec = importlib.util.find_spec("lmdeploy")
        if spec is None or not spec.submodule_search_locations:
            raise LayoutUncheckable("lmdeploy is not installed (or not importable) here")
        path = os.path.join(next(iter(spec.submodule_search_locations)), "turbomind", "parallel_config.py")
        file_spec = importlib.util.spec_from_file_location("_launch_lmdeploy_parallel_config", path)
        if file_spec is None or file_spec.loader is None or not os.path.isfile(path):
            raise LayoutUncheckable(f"the installed lmdeploy has no {path}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[file_spec.name] = module  # its @dataclass looks the module up while it runs
        file_spec.loader.exec_module(module)
        _derive = module.derive_parallel_config
    return _derive


@dataclass(frozen=True)
class ParallelCheck:
    tp: int
    nnodes: int
    gpus_per_node: int
    device_num: int  # what lmdeploy derived: GPUs used in all


def check_parallel(tp: int, *, nnodes: int = 1, gpus_per_node: int | None = None, cp: int = 1) -> ParallelCheck:
    """Ask lmdeploy's function, as TurboMind does (``available = GPUs per node x nnodes``), whether
    ``tp`` (with context parallelism ``cp``) runs on ``nnodes`` nodes of ``gpus_per_node`` GPUs
    (default ``tp / nnodes``), using every one of the tp GPUs; ``LayoutRefused`` (or, for cp,
    ``ContextParallelRefused``) with its reason otherwise. ``tp``, ``cp`` and ``nnodes`` come checked
    (the request's flags, a preset's values): they are not checked here again."""
    if cp not in CP_SIZES:
        raise ContextParallelRefused(cp, tp, f"TurboMind's kernels take a context-parallel size of "
                                     f"{', '.join(map(str, CP_SIZES[1:]))}")
    if gpus_per_node is None:
        if tp % nnodes:
            raise LayoutRefused(tp, nnodes, 0, f"tp {tp} does not divide into {nnodes} equal node shares")
        gpus_per_node = tp // nnodes
    derive = lmdeploy_derive_parallel_config()
    try:
        parallel = derive(1, tp, 1, cp, None, gpus_per_node * nnodes)  # dp, tp, ep, cp, device_num, available
    except AssertionError as err:
        if cp > 1:
            said = str(err).split(";")[0]
            raise ContextParallelRefused(cp, tp, f"lmdeploy's layout check refuses it ({said}); tp must be a "
                                         f"multiple of cp, e.g. --tp {-(-tp // cp) * cp} --cp {cp}") from None
        raise LayoutRefused(tp, nnodes, gpus_per_node, f"lmdeploy says: {err}") from None
    if parallel.device_num != tp or parallel.device_num % nnodes:
        raise LayoutRefused(tp, nnodes, gpus_per_node,
                            f"lmdeploy would use {parallel.device_num} GPU(s), not {tp} split evenly over the nodes")
    return ParallelCheck(tp, nnodes, parallel.device_num // nnodes, parallel.device_num)
