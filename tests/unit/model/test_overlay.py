"""The overlay: a patched view that never writes into its source (above all a Hugging Face cache)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.model.modeldir import NotAModelDir, read_model_config
from launcher.model.overlay import (
    PROVENANCE,
    StaleOverlay,
    build_overlay,
    check_overlay,
    config_bytes,
    source_files,
)
from launcher.model.owned import OverlayConflict, OverlayNotWritable, as_written
from launcher.plan.build import PlanRequest, build_plan, make_overlay
from tests.conftest import LLAMA


def make_hf_snapshot(root: Path, files: dict[str, bytes], sha: str = "a" * 40) -> Path:
    """A Hugging Face cache layout: blobs named by hash, snapshot files as relative symlinks."""
    repo = root / "hub" / "models--org--tiny"
    blobs = repo / "blobs"
    snap = repo / "snapshots" / sha
    blobs.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for rel, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        (blobs / etag).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blobs / etag, link.parent), link)
    return snap


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under root with its content hash or link target."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "link:" + os.readlink(full)
            else:
                out[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return out


@pytest.fixture
def snapshot(tmp_path):
    return make_hf_snapshot(
        tmp_path / "hf",
        {
            "config.json": json.dumps(LLAMA).encode(),
            "model.safetensors": b"\0" * 4096,
            "tokenizer.json": b"{}",
            "sub/extra.txt": b"hello",
        },
    )


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def patch_plan(model, **kw):
    return build_plan(PlanRequest(model=str(model), need_files=True, **kw))


def test_overlay_has_a_real_patched_config_and_links_to_resolved_blobs(snapshot, hf_home):
    before = tree_digest(hf_home)
    overlay = make_overlay(patch_plan(snapshot, factor="2"))
    cfg = overlay.path / "config.json"
    assert cfg.is_file() and not cfg.is_symlink()
    patched = json.loads(cfg.read_text())
    assert patched["rope_scaling"] == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}
    assert patched["max_position_embeddings"] == 256
    for rel in ("model.safetensors", "tokenizer.json", "sub/extra.txt"):
        link = overlay.path / rel
        assert link.is_symlink()
        target = os.readlink(link)
        assert os.path.isabs(target) and "/blobs/" in target  # resolved, not a chain of links
        assert link.read_bytes() == (snapshot / rel).read_bytes()
    prov = json.loads((overlay.path / PROVENANCE).read_text())
    assert prov["source"] == os.path.realpath(snapshot)
    assert prov["rope"]["type"] == "dynamic" and prov["rope"]["factor"] == 2.0
    assert prov["rope"]["original"] is None and prov["rope"]["written"]["factor"] == 2.0
    assert prov["rope"]["max_position_embeddings"] == {"original": 256, "written": 256}
    assert prov["version"]
    # the cache is byte-for-byte what it was, links included
    assert tree_digest(hf_home) == before
    assert overlay.path.is_relative_to(Path(os.environ["XDG_CACHE_HOME"]) / "launch" / "overlays")


def test_same_settings_reuse_the_overlay_other_settings_get_another(snapshot, hf_home):
    first = make_overlay(patch_plan(snapshot, factor="2"))
    mtime = (first.path / "config.json").stat().st_mtime_ns
    second = make_overlay(patch_plan(snapshot, factor="2"))
    assert second.reused and not first.reused
    assert second.path == first.path
    assert (second.path / "config.json").stat().st_mtime_ns == mtime
    third = make_overlay(patch_plan(snapshot, factor="4", rope_type="yarn"))
    assert third.path != first.path
    assert json.loads((third.path / "config.json").read_text())["max_position_embeddings"] == 1024
    assert (first.path / "config.json").exists()


def test_overlay_picks_up_files_the_source_gained(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA))
    first = make_overlay(patch_plan(src, factor="2"))
    assert not (first.path / "model.safetensors").exists()
    (src / "model.safetensors").write_bytes(b"\0" * 10)
    second = make_overlay(patch_plan(src, factor="2"))
    assert second.path == first.path and not second.reused
    assert (second.path / "model.safetensors").is_symlink()
    assert not [p for p in second.path.parent.iterdir() if p.name.startswith(".")]


def test_out_places_the_overlay_and_refuses_foreign_directories(snapshot, hf_home, tmp_path):
    out = tmp_path / "my-overlay"
    overlay = make_overlay(patch_plan(snapshot, factor="2", out=out))
    assert overlay.path == out and (out / "config.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OverlayConflict) as err:
        make_overlay(patch_plan(snapshot, factor="2", out=foreign))
    assert "not a launch overlay" in str(err.value)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_overlay_inside_the_hf_cache_or_the_source_is_refused(snapshot, hf_home):
    before = tree_digest(hf_home)
    with pytest.raises(OverlayConflict) as err:
        make_overlay(patch_plan(snapshot, factor="2", out=hf_home / "hub" / "patched"))
    assert "Hugging Face cache" in str(err.value)
    with pytest.raises(OverlayConflict):
        make_overlay(patch_plan(snapshot, factor="2", out=snapshot / "patched"))
    assert tree_digest(hf_home) == before


def test_unwritable_location_is_a_clear_error_and_leaves_nothing(tmp_path, snapshot, hf_home):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OverlayNotWritable) as err:
        make_overlay(patch_plan(snapshot, factor="2", out=blocker / "overlay"))
    assert str(blocker / "overlay") in str(err.value)
    assert blocker.read_text() == "x"


def test_stale_links_are_detected(snapshot, hf_home):
    overlay = make_overlay(patch_plan(snapshot, factor="2"))
    check_overlay(overlay.path)
    blob = Path(os.path.realpath(snapshot / "tokenizer.json"))
    blob.unlink()
    with pytest.raises(StaleOverlay) as err:
        check_overlay(overlay.path)
    assert "tokenizer.json" in str(err.value)
    with pytest.raises(NotAModelDir) as err:
        source_files(snapshot)
    assert "incomplete" in str(err.value)


def test_build_overlay_reports_a_source_without_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAModelDir):
        read_model_config(empty)


_RACE = r"""
import sys, json
from pathlib import Path
from launcher.model.overlay import build_overlay
src, target, barrier, factor = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
config = json.loads((Path(src) / "config.json").read_text())
config["rope_scaling"] = {"type": "dynamic", "rope_type": "dynamic", "factor": factor}
while not barrier.exists():
    pass
o = build_overlay(Path(src), config, {"tool": "launch"}, Path(target))
print(o.path, o.reused)
"""


def race_builds(tmp_path: Path, shard_dir: str, shards: int, factors: tuple[str, ...]) -> tuple[Path, Path, list]:
    """One process per factor builds the overlay of the same model into the same place, all let go
    at once; every one must succeed. ``(source, target, [(stdout, stderr), ...])``."""
    src = tmp_path / "model"
    (src / shard_dir).mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(LLAMA))
    for i in range(shards):
        (src / shard_dir / f"shard-{i}.safetensors").write_bytes(b"x")
    target = tmp_path / "overlays" / "same"
    barrier = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, str(src), str(target), str(barrier), factor],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for factor in factors
    ]
    barrier.write_text("go")
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    return src, target, results


@pytest.mark.parametrize("round_", range(4))
def test_concurrent_builds_both_end_with_one_complete_identical_overlay(tmp_path, round_):
    src, target, results = race_builds(tmp_path, "deep/er", 200, ("2", "2", "2"))
    assert {out.split()[0] for out, _ in results} == {str(target)}
    files = source_files(src)
    assert len(files) == 200
    for rel, real in files.items():
        assert os.readlink(target / rel) == real
    assert json.loads((target / "config.json").read_text())["rope_scaling"]["factor"] == 2.0
    assert sorted(p.name for p in target.parent.iterdir()) == ["same"]  # no temporary leftovers


def test_config_bytes_round_trip():
    assert json.loads(config_bytes({"a": "书生", "b": [1, 2]})) == {"a": "书生", "b": [1, 2]}


def test_build_overlay_never_writes_into_the_source(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA))
    (src / "w.safetensors").write_bytes(b"abc")
    before = tree_digest(src)
    build_overlay(src, {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}}, {}, tmp_path / "o")
    assert tree_digest(src) == before


def test_out_naming_an_existing_file_is_refused_and_the_file_kept(snapshot, hf_home, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(OverlayConflict) as err:
        make_overlay(patch_plan(snapshot, factor="2", out=notes))
    assert "not a directory" in str(err.value)
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", "notes.txt"])


def test_slug_is_one_safe_path_component():
    from launcher.runtime.paths import slug

    assert slug("../../etc") == "etc" and "/" not in slug("a/b") and slug("..") == "model"


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_builds_with_other_settings_all_succeed_and_leave_one_complete_overlay(tmp_path, round_):
    factors = ("2", "3", "4", "5")
    src, target, _ = race_builds(tmp_path, "deep", 100, factors)
    final = json.loads((target / "config.json").read_text())["rope_scaling"]["factor"]
    assert str(int(final)) in factors
    files = source_files(src)
    assert {str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir()} == {
        *files, "config.json", PROVENANCE}
    for rel, real in files.items():
        assert os.readlink(target / rel) == real
    assert sorted(p.name for p in target.parent.iterdir()) == ["same"]  # no .tmp / .old leftovers


def test_an_entry_that_vanishes_mid_check_is_changed_not_a_crash(tmp_path):
    """Another run swapping its overlay in can remove an entry between the walk and its check (seen
    as a FileNotFoundError traceback in about 1 in 120 racing builds before)."""

    os.symlink("/x", tmp_path / "link")
    assert as_written(str(tmp_path / "link"), "link:/x") is True
    assert as_written(str(tmp_path / "gone"), "link:/x") is False
    (tmp_path / "file").write_text("a")
    assert as_written(str(tmp_path / "file"), "link:/x") is False


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o711, 0o1777, 0o2775])
def test_an_empty_out_directory_keeps_its_mode_and_so_does_a_replaced_overlay(tmp_path, mode):
    """An empty --out is replaced by the overlay's directory in one rename: it takes the mode the user
    gave it (0700 stays private), and rebuilding with other settings keeps it again."""
    import stat

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA))
    (src / "w.safetensors").write_bytes(b"abc")
    out = tmp_path / "o"
    out.mkdir()
    os.chmod(out, mode)
    build_overlay(src, {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}}, {}, out)
    assert stat.S_IMODE(os.lstat(out).st_mode) == mode and (out / "config.json").is_file()
    build_overlay(src, {**LLAMA, "rope_scaling": {"type": "linear", "factor": 3.0}}, {}, out)
    assert stat.S_IMODE(os.lstat(out).st_mode) == mode
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["factor"] == 3.0
