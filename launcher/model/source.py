"""MODEL -> where its config (and, when needed, its files) come from.

MODEL is a local model directory, a preset name, or (with the download module) a Hugging Face repo
id. Every command first needs only a config (``resolve``): for a preset that has not been
downloaded, the preset's own config facts stand in; a repo id reads config.json alone (nothing written into the Hugging Face cache). ``patch``
and ``serve`` then plan from it, and only after every check passed get the files (``with_files``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.model.modeldir import NotAModelDir, parse_model_config, read_model_config
from launcher.model.presets import UnknownPreset, find_preset, suggestions
from launcher.model.presetschema import Preset
from launcher.runtime.paths import hf_cache_dir, is_repo_id, repo_folder


@dataclass(frozen=True)
class ModelSource:
    label: str  # what the user typed
    name: str  # short name: served model name, overlay name
    config: dict
    config_origin: str  # a config.json path, or "preset NAME"
    path: Path | None = None  # local model directory, when there is one
    preset: Preset | None = None
    repo_id: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    complete: bool = True  # ``path`` holds what serving needs: nothing to download

    @property
    def has_files(self) -> bool:
        return self.path is not None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(("/", os.sep)) or os.sep + os.sep in text


def from_dir(path: Path, label: str | None = None, preset: Preset | None = None, repo_id: str | None = None,
             revision: str | None = None, trust_remote_code: bool | None = None) -> ModelSource:
    path = Path(path).expanduser()
    config = read_model_config(path)
    if trust_remote_code is None:
        trust_remote_code = preset.trust_remote_code if preset else False
    return ModelSource(
        label=label or str(path),
        name=preset.name if preset else (repo_id.split("/")[-1] if repo_id else (path.resolve().name or "model")),
        config=config,
        config_origin=str(path / "config.json"),
        path=path,
        preset=preset,
        repo_id=repo_id or (preset.repo if preset else None),
        revision=revision or (preset.revision if preset else None),
        trust_remote_code=trust_remote_code,
    )


def from_preset_facts(preset: Preset) -> ModelSource:
    return ModelSource(
        label=preset.name,
        name=preset.name,
        config=preset.stub_config(),
        config_origin=f"preset {preset.name} (config facts; checkpoint not downloaded)",
        preset=preset,
        repo_id=preset.repo,
        revision=preset.revision,
        trust_remote_code=preset.trust_remote_code,
        complete=False,
    )


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """A snapshot of ``repo_id`` already in the Hugging Face cache that has a config.json, found
    without a request by huggingface_hub's own lookup (launcher/model/hubcache.py). When the cache holds
    nothing of the repo, huggingface_hub is not even imported (``plan``'s start-up)."""
    if not (hf_cache_dir() / repo_folder(repo_id)).is_dir():
        return None
    from launcher.model.hubcache import cached_config

    found = cached_config(repo_id, revision)
    return found.parent if found is not None else None


@dataclass(frozen=True)
class Fetching:
    """How to reach the Hub when a model must come from it."""

    revision: str | None = None
    quiet: bool = False
    timeout_s: float | str | None = None
    trust_remote_code: bool | None = None


def _trust(how: Fetching, preset: Preset | None) -> bool:
    if how.trust_remote_code is not None:
        return how.trust_remote_code
    return preset.trust_remote_code if preset else False


def _config_only(repo_id: str, preset: Preset | None, label: str, how: Fetching) -> ModelSource:
    """The config of ``repo_id`` alone, read without writing anything into the Hugging Face cache
    (the command may still be refused on it); its commit pins the files ``with_files`` gets."""
    from launcher.model.hub import read_config

    data, sha = read_config(repo_id, revision=how.revision or (preset.revision if preset else None),
                            timeout_s=how.timeout_s)
    origin = f"{repo_id}@{sha[:12]} config.json"
    return ModelSource(
        label=label, name=preset.name if preset else repo_id.split("/")[-1],
        config=parse_model_config(data, origin), config_origin=origin, preset=preset, repo_id=repo_id,
        revision=sha, trust_remote_code=_trust(how, preset), complete=False,
    )


def _fetch(repo_id: str, preset: Preset | None, label: str, how: Fetching,
           commit: str | None = None) -> ModelSource:
    from launcher.model.hub import fetch

    trust = _trust(how, preset)
    result = fetch(
        repo_id,
        revision=how.revision or (preset.revision if preset else None),
        trust_remote_code=trust,
        quiet=how.quiet,
        timeout_s=how.timeout_s,
        commit=commit,
    )
    if not how.quiet:
        import sys

        print(result.summary(), file=sys.stderr)
    return from_dir(result.path, label=label, preset=preset, repo_id=repo_id, revision=result.commit_sha,
                    trust_remote_code=trust)


def resolve(model: str, *, need_files: bool = False, fetching: Fetching | None = None) -> ModelSource:
    """Find MODEL: a local directory (wins over a preset of the same name), a preset, or a repo id.

    Without ``need_files`` only a config is needed: a preset uses its cached snapshot when there is
    one, else its own config facts (no request at all); a repo id fetches config.json alone, never
    the weights. ``need_files``: download what serving needs at once (``launch fetch``; patch and
    serve plan first, then call ``with_files``).
    """
    how = fetching or Fetching()
    candidate = Path(model).expanduser()
    if candidate.is_dir():
        return from_dir(candidate, label=model, trust_remote_code=how.trust_remote_code)
    preset = find_preset(model)
    if preset is not None:
        if need_files:
            return _fetch(preset.repo, preset, model, how)
        cached = cached_snapshot(preset.repo, how.revision or preset.revision)
        if cached is not None:
            source = from_dir(cached, label=model, preset=preset, trust_remote_code=how.trust_remote_code)
            # its files are checked (and the branch followed) by ``with_files`` before they are used
            return replace(source, path=cached if _has_weights(cached) else None, complete=False)
        return from_preset_facts(preset)
    if is_repo_id(model) and not _looks_like_path(model):
        return _fetch(model, None, model, how) if need_files else _config_only(model, None, model, how)
    if _looks_like_path(model) or candidate.exists():
        raise NotAModelDir(str(candidate), "no such directory")
    raise UnknownPreset(model, suggestions(model))


def _has_weights(snapshot: Path) -> bool:
    return any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))


def with_files(source: ModelSource, fetching: Fetching | None = None) -> ModelSource:
    """``source`` with the files serving needs (downloaded when they come from the Hub).

    A local directory is returned as it is. A repo id whose config was fetched alone is downloaded
    at that config's commit, so the files are the ones planned with (and the branch asked for is
    recorded in the cache); a preset follows its pinned revision, else the branch (one request: the
    branch may have moved since its snapshot was cached).
    """
    if source.complete or source.repo_id is None:
        return source
    commit = source.revision if source.preset is None else None
    return _fetch(source.repo_id, source.preset, source.label, fetching or Fetching(), commit)
