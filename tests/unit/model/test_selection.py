"""Which files serving needs (launcher/model/selection.py): pure decisions from a repo's file list."""

from __future__ import annotations

import json

import pytest

from launcher.model.selection import HubFileMissing, NoWeights, read_weight_map, select_files, serving_files
from tests.support.fakehub import tiny_repo_files

SERVING_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
}
SKIPPED = {"pytorch_model.bin", "original/consolidated.00.pth", "original/params.json", "modeling_tiny.py",
           "README.md", ".gitattributes"}


def test_selection_takes_serving_files_and_skips_other_formats():
    paths = list(tiny_repo_files())
    chosen = select_files(paths)
    assert set(chosen.files) == SERVING_FILES
    assert set(chosen.skipped) == SKIPPED
    assert chosen.weights == ("model.safetensors",) and chosen.weights_format == "safetensors"
    with_code = select_files(paths, trust_remote_code=True)
    assert set(with_code.files) == SERVING_FILES | {"modeling_tiny.py"}


def test_selection_follows_the_weight_index():
    paths = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin.index.json",
             "pytorch_model-00001-of-00002.bin", "tokenizer.json"]
    before = select_files(paths)
    assert before.index == "model.safetensors.index.json" and before.weights == ()
    assert "pytorch_model.bin.index.json" not in before.files and "model.safetensors.index.json" in before.meta
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    after = select_files(paths, weight_map=shards)
    assert after.weights == tuple(sorted(shards.values()))
    assert "consolidated.safetensors" in after.skipped and "pytorch_model-00001-of-00002.bin" in after.skipped


def test_selection_falls_back_to_bin_and_reports_no_weights():
    chosen = select_files(["config.json", "pytorch_model.bin", "training_args.bin", "model.gguf"])
    assert chosen.weights == ("pytorch_model.bin",) and chosen.weights_format == "bin"
    assert {"training_args.bin", "model.gguf"} <= set(chosen.skipped)
    assert select_files(["config.json", "model.Q4_K_M.gguf"]).weights_format is None


def test_a_repo_to_serve_needs_a_config_and_weights():
    with pytest.raises(HubFileMissing, match="org/x@main has no config.json"):
        serving_files(["model.safetensors"], "org/x", "main")
    with pytest.raises(NoWeights, match=r"it has: model.Q4_K_M.gguf, onnx/model.onnx\)"):
        serving_files(["config.json", "model.Q4_K_M.gguf", "onnx/model.onnx", "README.md"], "org/x", "main")
    assert serving_files(["config.json", "pytorch_model.bin"], "org/x", "main").weights == ("pytorch_model.bin",)


def test_weight_map_is_read_only_from_an_index_that_has_one(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": 2}}))
    assert read_weight_map(index) == {"a": "model-1.safetensors", "b": "2"}
    for text in ("{}", '{"weight_map": {}}', "[1]", "not json"):
        index.write_text(text)
        assert read_weight_map(index) is None
    assert read_weight_map(tmp_path / "absent.json") is None
