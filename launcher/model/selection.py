"""Which files of a checkpoint repo serving needs, decided from its file list alone (no network,
no cache; only a weight index is read from a file). launcher/model/hub.py downloads what this chooses."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LaunchError


class HubFileMissing(LaunchError):
    repo_id: str
    revision: str
    filename: str
    message = "{repo_id}@{revision} has no {filename}; it is not a transformers checkpoint launch can serve."


class NoWeights(LaunchError):
    repo_id: str
    revision: str
    found: tuple[str, ...] = ()

    def message(self) -> str:
        found = f" (it has: {', '.join(self.found[:4])})" if self.found else ""
        return (f"{self.repo_id}@{self.revision} has no safetensors or PyTorch .bin weights at its top level"
                f"{found}; launch serves transformers checkpoints. Pick the repo of the original (non-GGUF) model.")


META_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")  # what serving reads besides weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx",
                   ".ot", ".tflite", ".pkl", ".npz")  # only safetensors (else .bin) are taken
NOT_WEIGHTS = frozenset({"training_args.bin"})


@dataclass(frozen=True)
class Selection:
    """The files of a repo that serving needs, decided from its file list."""

    files: tuple[str, ...]
    weights: tuple[str, ...]
    weights_format: str | None  # "safetensors", "bin", or None: no weights at the top level
    index: str | None  # the weight index; until it is read (weight_map None) weights are not known
    skipped: tuple[str, ...]

    @property
    def meta(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if f not in self.weights)


def select_files(paths: Iterable[str], *, trust_remote_code: bool = False,
                 weight_map: Mapping[str, str] | None = None) -> Selection:
    """Choose from a repo's file list. Top level only (``original/``, ``onnx/``... are other
    formats). Config/tokenizer/generation files (``*.json``, ``*.model``, ``*.tiktoken``,
    ``*.txt``, ``*.jinja``); ``*.py`` only with ``trust_remote_code``; safetensors weights, or
    ``.bin`` weights when there are no safetensors. With a weight index, the weights are exactly
    the files its ``weight_map`` names (so a ``consolidated.safetensors`` copy is skipped); pass the
    index's ``weight_map`` once it is read."""
    every = sorted(set(paths))
    top = [p for p in every if "/" not in p]
    safetensors = [p for p in top if p.endswith(".safetensors")]
    bins = [p for p in top if p.endswith(".bin") and p not in NOT_WEIGHTS]
    if safetensors:
        fmt, candidates, index_suffix = "safetensors", safetensors, ".safetensors.index.json"
    elif bins:
        fmt, candidates, index_suffix = "bin", bins, ".bin.index.json"
    else:
        fmt, candidates, index_suffix = None, [], None
    index = None
    if index_suffix:
        indexes = [p for p in top if p.endswith(index_suffix)]
        preferred = ("model" if fmt == "safetensors" else "pytorch_model") + index_suffix
        index = preferred if preferred in indexes else (indexes[0] if indexes else None)
    if index is None:
        weights = tuple(candidates)
    elif weight_map is None:
        weights = ()
    else:
        weights = tuple(sorted(set(weight_map.values())))
    meta = [p for p in top if p.endswith(META_SUFFIXES) and (not p.endswith(".index.json") or p == index)]
    code = [p for p in top if p.endswith(".py")] if trust_remote_code else []
    files = tuple(sorted(set(meta) | set(weights) | set(code)))
    skipped = tuple(p for p in every if p not in files)
    return Selection(files=files, weights=weights, weights_format=fmt, index=index, skipped=skipped)


def serving_files(paths: Iterable[str], repo_id: str, revision: str, *,
                  trust_remote_code: bool = False) -> Selection:
    """``select_files`` for a repo that must be served: HubFileMissing without a config.json,
    NoWeights (naming what weight-like files it has) without safetensors or .bin weights."""
    paths = list(paths)
    if "config.json" not in paths:
        raise HubFileMissing(repo_id, revision, "config.json")
    selection = select_files(paths, trust_remote_code=trust_remote_code)
    if selection.weights_format is None:
        raise NoWeights(repo_id, revision, tuple(p for p in sorted(paths) if p.endswith(WEIGHT_SUFFIXES)))
    return selection


def read_weight_map(index_file: Path) -> dict[str, str] | None:
    """The ``weight_map`` of a weight index file; None when it is unreadable, not JSON, or has none."""
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in weight_map.items()} if isinstance(weight_map, dict) and weight_map else None

