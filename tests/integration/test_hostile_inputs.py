"""Hostile but honest input (issue 9), one test per class with the real thing: launch either does
what was asked or refuses with one line, no traceback, and nothing written, changed or lost.

The CLI runs in-process (``launcher.cli.main``) except where a failure could hurt the test run
itself (the YAML alias bomb runs in a subprocess with a memory limit)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from tests.conftest import LLAMA, REPO, tree_state

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def refused(result, *needles: str, exit_code: int | None = None) -> str:
    code, out, err = result
    assert code != 0 if exit_code is None else code == exit_code, (code, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("launch: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def make_model(path: Path, config: dict | str) -> Path:
    path.mkdir(parents=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


# --- 1. --out: launch replaces only what it can prove it wrote --------------------------------


def test_a_user_file_in_out_survives_and_launch_replaces_only_its_own_overlay(tmp_path, capsys, model_dir):
    out = tmp_path / "ov"
    code, stdout, err = cli(capsys, "patch", str(model_dir), "--factor", "2", "--out", str(out))
    assert code == 0 and stdout.strip().splitlines()[-1] == str(out), err
    manifest = json.loads((out / "launch-patch.json").read_text())["files"]
    assert sorted(manifest) == ["config.json", "launch-patch.json", "model.safetensors"]

    (out / "notes.txt").write_text("my own notes")
    (out / "sub").mkdir()
    before = tree_state(tmp_path)
    for factor in ("2", "3"):  # the same settings, and other ones
        refused(cli(capsys, "patch", str(model_dir), "--factor", factor, "--out", str(out)),
                str(out), "notes.txt", "sub", "did not write", exit_code=2)
        assert tree_state(tmp_path) == before

    # Without the user's things it is launch's own overlay again: replaced in place.
    (out / "notes.txt").unlink()
    (out / "sub").rmdir()
    code, _stdout, err = cli(capsys, "patch", str(model_dir), "--factor", "3", "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["factor"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov", "tiny"]  # no leftovers beside it


@pytest.mark.parametrize("edit", ["config.json", "model.safetensors"])
def test_an_entry_the_user_changed_inside_an_overlay_is_not_launchs_any_more(tmp_path, capsys, model_dir, edit):
    out = tmp_path / "ov"
    code, _stdout, err = cli(capsys, "patch", str(model_dir), "--factor", "2", "--out", str(out))
    assert code == 0, err
    entry = out / edit
    entry.unlink()  # the user's own copy in place of launch's file or link
    entry.write_text("edited by hand")
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(model_dir), "--factor", "3", "--out", str(out)), edit, "did not write", exit_code=2)
    assert tree_state(tmp_path) == before


def test_a_launch_patch_json_without_a_manifest_proves_nothing(tmp_path, capsys, model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "launch-patch.json").write_text(json.dumps({"tool": "launch", "source": str(model_dir)}))
    (out / "thesis.tex").write_text("years of work")
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(model_dir), "--factor", "2", "--out", str(out)),
            "not a launch overlay", "thesis.tex", exit_code=2)
    assert tree_state(tmp_path) == before


def test_an_overlay_of_an_older_launch_without_a_manifest_is_left_alone(tmp_path, capsys, model_dir):
    out = tmp_path / "old"
    code, _stdout, err = cli(capsys, "patch", str(model_dir), "--factor", "2", "--out", str(out))
    assert code == 0, err
    prov = json.loads((out / "launch-patch.json").read_text())
    del prov["files"]
    (out / "launch-patch.json").write_text(json.dumps(prov))
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(model_dir), "--factor", "3", "--out", str(out)), "older launch", "Delete it yourself if it is",
            exit_code=2)
    assert tree_state(tmp_path) == before


def test_out_can_be_checked_before_anything_is_downloaded(tmp_path, model_dir):
    from launcher.model.overlay import check_out
    from launcher.model.owned import OverlayConflict
    from launcher.runtime.outdir import BadOutPath

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    before = tree_state(tmp_path)
    assert check_out(tmp_path / "new") == tmp_path / "new"
    for bad, error in ((tmp_path / "foreign", OverlayConflict), (tmp_path / "file", OverlayConflict),
                       (Path(os.environ["HF_HOME"]) / "hub" / "x", OverlayConflict), ("", BadOutPath)):
        with pytest.raises(error):
            check_out(bad)
    assert tree_state(tmp_path) == before


def test_an_empty_out_directory_is_used(tmp_path, capsys, model_dir):
    out = tmp_path / "empty"
    out.mkdir()
    code, _stdout, err = cli(capsys, "patch", str(model_dir), "--factor", "2", "--out", str(out))
    assert code == 0 and (out / "config.json").is_file(), err


def test_removing_an_old_overlay_takes_only_what_its_manifest_names(tmp_path, model_dir):
    # The last step of a replacement, after a file appeared in the old overlay: it stays.
    from launcher.model.overlay import build_overlay
    from launcher.model.owned import remove_own

    old = tmp_path / "old"
    build_overlay(model_dir, {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}}, {}, old)
    (old / "late.txt").write_text("arrived during the swap")
    remove_own(old)
    assert sorted(p.name for p in old.iterdir()) == ["late.txt"]


@pytest.mark.parametrize(
    "out, needle",
    [("", "names no new directory"), ("a" * 300, "300 bytes long"), ("ov\x01x", "control character"),
     ("ov\nx", "control character")],
)
def test_out_names_that_cannot_be_a_directory_get_one_clean_line(tmp_path, capsys, model_dir, monkeypatch, out,
                                                                 needle):
    monkeypatch.chdir(tmp_path)
    before = tree_state(tmp_path)
    err = refused(cli(capsys, "patch", str(model_dir), "--factor", "2", "--out", out), needle)
    assert "\x01" not in err and tree_state(tmp_path) == before


def test_a_source_with_a_very_long_name_gets_a_default_overlay_that_fits(tmp_path, capsys):
    src = make_model(tmp_path / ("m" * 250), LLAMA)
    code, out, err = cli(capsys, "patch", str(src), "--factor", "2")
    assert code == 0, err
    assert len(Path(out.splitlines()[-1]).name.encode()) <= 255


@pytest.mark.parametrize("factor", ["\uff13", "1_0", "\u0663"])
def test_a_factor_must_be_written_in_ascii_digits(capsys, model_dir, factor):
    refused(cli(capsys, "plan", str(model_dir), "--factor", factor), f"--factor {factor!r}: must be a number")


def test_a_linked_subdirectory_comes_out_complete(tmp_path, capsys):
    shared = tmp_path / "shared_tok"
    (shared / "deeper").mkdir(parents=True)
    (shared / "tokenizer.json").write_text("{}")
    (shared / "deeper" / "merges.txt").write_text("a b")
    src = make_model(tmp_path / "model", LLAMA)
    os.symlink("../shared_tok", src / "tokdir")
    out = tmp_path / "ov"
    code, _stdout, err = cli(capsys, "patch", str(src), "--factor", "2", "--out", str(out))
    assert code == 0, err
    assert (out / "tokdir" / "tokenizer.json").read_text() == "{}"
    assert (out / "tokdir" / "deeper" / "merges.txt").read_text() == "a b"
    assert os.readlink(out / "tokdir" / "deeper" / "merges.txt") == str(shared.resolve() / "deeper" / "merges.txt")


def test_a_directory_link_loop_is_refused(tmp_path, capsys):
    src = make_model(tmp_path / "model", LLAMA)
    (src / "sub").mkdir()
    os.symlink("..", src / "sub" / "up")
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(src), "--factor", "2", "--out", str(tmp_path / "ov")), "sub/up", "loop")
    assert tree_state(tmp_path) == before


# --- 2/3. config values: a type and a range, the error names file, field and value ----------


def _with(**changes) -> dict:
    config = dict(LLAMA)
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    "config, needles",
    [
        (_with(num_key_value_heads="abc"), ("num_key_value_heads", "'abc'")),
        (_with(head_dim=[128]), ("head_dim", "[128]")),
        (_with(num_attention_heads=-4), ("num_attention_heads", "-4")),
        (_with(num_key_value_heads=0), ("num_key_value_heads", "found 0")),
        (_with(head_dim=0), ("head_dim", "found 0")),
        (_with(num_hidden_layers=True), ("num_hidden_layers", "True")),
        (_with(architectures=5), ("architectures", "found 5")),
        (_with(architectures="LlamaForCausalLM"), ("architectures", "'LlamaForCausalLM'")),
        (_with(max_position_embeddings=1e30), ("max_position_embeddings", "1e+30", "2,147,483,647")),
        (_with(max_position_embeddings=2048.5), ("max_position_embeddings", "2048.5")),
        (_with(rope_theta="big"), ("rope_theta", "'big'")),
        (_with(rope_scaling={"type": "dynamic", "factor": "2"}), ("rope_scaling.factor", "'2'")),
        (_with(rope_scaling={"type": 5, "factor": 2.0}), ("rope_scaling.type", "found 5")),
        (_with(torch_dtype=16), ("torch_dtype", "found 16")),
        ({**_with(rope_theta=...), "architectures": ["InternLMForCausalLM"], "rotary": {"base": "10000"}},
         ("rotary.base", "'10000'")),
        ({"architectures": ["VLM"], "text_config": _with(head_dim=-1)}, ("head_dim", "-1")),
    ],
)
@pytest.mark.parametrize("command", ["plan", "patch"])
def test_config_values_of_the_wrong_type_or_range_are_refused_naming_file_field_value(
        tmp_path, capsys, command, config, needles):
    src = make_model(tmp_path / "model", config)
    before = tree_state(tmp_path)
    refused(cli(capsys, command, str(src), "--factor", "2"), str(src / "config.json"), *needles)
    assert tree_state(tmp_path) == before
    assert not (Path(os.environ["XDG_CACHE_HOME"]) / "launch").exists()


@pytest.mark.parametrize(
    "text, needle",
    [("[" * 100_000 + "]" * 100_000, "nests too deeply"),
     ('{"a":' * 5000 + "1" + "}" * 5000, "nests too deeply"),
     ('{"x":' * 70 + "1" + "}" * 70, "more than 64 levels"),
     ("[1, 2]", "not an object"), ('"config"', "not an object"),
     ('{"max_position_embeddings": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
     ('\ufeff{"a": 1}', "BOM")],
)
def test_config_json_nested_absurdly_deep_or_not_an_object(tmp_path, capsys, text, needle):
    src = make_model(tmp_path / "model", text)
    before = tree_state(tmp_path)
    refused(cli(capsys, "plan", str(src), "--factor", "2"), "config.json", needle)
    assert tree_state(tmp_path) == before


def test_a_path_with_a_newline_stays_one_line(tmp_path, capsys):
    src = make_model(tmp_path / "two\nlines\x1b[31m", _with(head_dim="x"))
    err = refused(cli(capsys, "plan", str(src), "--factor", "2"), "two\\nlines\\x1b[31m", "head_dim")
    assert "\x1b" not in err


@pytest.mark.parametrize("factor", ["1e305", "1e308", "9999999999"])
def test_a_huge_factor_is_refused_by_the_flag_range(tmp_path, capsys, model_dir, factor):
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(model_dir), "--factor", factor, "--out", str(tmp_path / "o")),
            "--factor", "at most 1024")
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("factor", ["4", "1000"])
def test_a_factor_whose_context_overflows_is_refused_by_the_rope_rules(tmp_path, capsys, factor):
    src = make_model(tmp_path / "model", json.dumps(_with(max_position_embeddings=2**30)))
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(src), "--factor", factor, "--out", str(tmp_path / "o")),
            "2147483647 tokens")
    assert tree_state(tmp_path) == before


def test_a_session_len_past_int32_is_refused(tmp_path, capsys, model_dir):
    refused(cli(capsys, "plan", str(model_dir), "--factor", "2", "--session-len", str(2**40)), "--session-len")


# --- 4. transformers-5 rope_parameters keyed per attention type (Gemma 3) ----------------------

GEMMA3_TEXT = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "max_position_embeddings": 131072,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


@pytest.mark.parametrize("flags", [["--factor", "2"], ["--factor", "2", "--type", "linear", "--force"],
                                   ["--factor", "16", "--type", "dynamic"]])
def test_gemma3_per_attention_rope_parameters_are_refused_never_dropped(tmp_path, capsys, flags):
    src = make_model(tmp_path / "gemma", GEMMA3_TEXT)
    nested = make_model(tmp_path / "gemma-mm", {"architectures": ["Gemma3ForConditionalGeneration"],
                                                "text_config": GEMMA3_TEXT})
    before = tree_state(tmp_path)
    refused(cli(capsys, "patch", str(src), *flags, "--out", str(tmp_path / "o")),
            "rope_parameters", "full_attention, sliding_attention", "as it is")
    refused(cli(capsys, "plan", str(nested), *flags), "text_config.rope_parameters", "per attention type")
    assert tree_state(tmp_path) == before


def test_lmdeploy_reads_the_gemma3_shape_only_as_a_fixed_linear_scaling():
    """The fact behind the refusal, from the installed lmdeploy's own code: its Gemma 3 model
    reads ``full_attention['factor']`` as linear scaling whatever type is written there, and the
    generic PyTorch parser sees no scaling in this shape at all."""
    import inspect
    from types import SimpleNamespace

    from lmdeploy.pytorch.models import gemma
    from lmdeploy.pytorch.nn.rotary_embedding import RopeType, build_rotary_params

    source = inspect.getsource(gemma)
    assert "full_attention['factor']" in source and "emb_type=RopeType.LinearScaling" in source
    params = build_rotary_params(SimpleNamespace(rope_parameters=GEMMA3_TEXT["rope_parameters"],
                                                 rope_scaling=GEMMA3_TEXT["rope_parameters"]))
    assert params["emb_type"] == RopeType.Default


# --- 8. presets and environment ----------------------------------------------------------------

GOOD = {
    "name": "mine", "repo": "me/mine", "native_context": 4096, "rope": {"type": "dynamic", "factor": 2.0},
    "parameters": 1.0e9,
    "config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "num_hidden_layers": 2,
               "hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "float16"},
}


@pytest.mark.parametrize("repo", ["../etc", "org/..", "a--b/c", "org/name.git", "/etc/passwd"])
def test_a_preset_repo_that_is_not_a_repo_id_fails_the_schema(tmp_path, capsys, monkeypatch, repo):
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**GOOD, "repo": repo}))
    refused(cli(capsys, "plan", "mine"), "mine.yaml", "'repo'", repr(repo))


def test_a_preset_whose_default_rope_the_rules_refuse_is_invalid_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    config = {**GOOD["config"], "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**GOOD, "config": config}))
    refused(cli(capsys, "presets"), "mine.yaml", "'rope'", "would replace it")


def test_yaml_beside_yml_is_an_error_naming_both(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    for suffix in (".yaml", ".yml"):
        (tmp_path / f"mine{suffix}").write_text(yaml.safe_dump(GOOD))
    refused(cli(capsys, "presets"), str(tmp_path / "mine.yaml"), str(tmp_path / "mine.yml"))


def test_launch_presets_dir_naming_a_file_is_an_error_naming_it(tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "presets.yaml"
    not_a_dir.write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(not_a_dir))
    refused(cli(capsys, "presets"), str(not_a_dir), "not a directory")


BOMB = "\n".join(
    [f'a0: &a0 ["{"x" * 8}"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
) + "\n"


def test_a_yaml_alias_bomb_in_a_user_preset_is_refused_without_growing_memory(tmp_path):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bomb.yaml").write_text(BOMB)  # 9**11 (31 billion) strings if expanded
    limit = 1 << 30

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "LAUNCH_PRESETS_DIR": str(presets), "PYTHONPATH": str(REPO)}
    for argv in (["presets"], ["plan", "bomb"], ["presets", "show", "bomb"]):
        result = subprocess.run([sys.executable, "-m", "launcher", *argv], capture_output=True, text=True,
                                env=env, timeout=60, preexec_fn=cap_memory, check=False)
        err = result.stderr
        assert result.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "bomb.yaml" in err and "anchor or alias" in err


def test_an_oversized_preset_is_refused_unread(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    (tmp_path / "big.yaml").write_text(yaml.safe_dump({**GOOD, "name": "big", "notes": ["x" * 1000] * 400}))
    refused(cli(capsys, "presets"), "big.yaml", "larger than 256 KiB")


def test_a_deeply_nested_preset_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    (tmp_path / "deep.yaml").write_text("notes: " + "[" * 50_000 + "]" * 50_000 + "\n")
    refused(cli(capsys, "presets"), "deep.yaml")


# --- 9. an explicit dynamic factor is honoured ------------------------------------------------

INTERNLM3 = {
    "architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", "max_position_embeddings": 32768,
    "rope_theta": 50000000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 6.0}, "num_hidden_layers": 2,
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "torch_dtype": "bfloat16",
}


def test_internlm3_dynamic_factor_4_is_honoured_with_a_note(tmp_path, capsys):
    code, out, err = cli(capsys, "plan", "internlm3-8b-instruct", "--factor", "4", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["session_len"] == 131072 and plan["rope_scaling"]["factor"] == 4.0
    assert plan["max_position_embeddings"] == 32768
    assert "the config had dynamic x6 (196608 tokens)" in " ".join(plan["warnings"])

    src = make_model(tmp_path / "internlm3", INTERNLM3)
    code, out, err = cli(capsys, "patch", str(src), "--factor", "4", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "warning: the config had dynamic x6" in err
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    from lmdeploy.pytorch.nn.rotary_embedding import RopeType, build_rotary_params
    from transformers import LlamaConfig

    params = build_rotary_params(LlamaConfig.from_dict(written))
    assert params["emb_type"] == RopeType.DynamicNTKScaling and params["scaling_factor"] == 4.0
    assert written["max_position_embeddings"] == 32768  # the NTK threshold stays N


@pytest.mark.parametrize("scaling, max_pos", [
    ({"rope_type": "linear", "factor": 6.0}, 32768),
    ({"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 32768}, 196608),
    ({"rope_type": "llama3", "factor": 6.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32768}, 196608),
])
def test_trained_scalings_still_refuse_a_smaller_factor_unless_forced(tmp_path, capsys, scaling, max_pos):
    src = make_model(tmp_path / "m", {**INTERNLM3, "rope_scaling": scaling, "max_position_embeddings": max_pos})
    refused(cli(capsys, "plan", str(src), "--factor", "4"), "less than", "--force")
    code, out, err = cli(capsys, "plan", str(src), "--factor", "4", "--force")
    assert code == 0 and "warning: shrinking the served context" in out, err


def test_dynamic_replacing_another_type_is_still_refused(tmp_path, capsys):
    src = make_model(tmp_path / "m", {**INTERNLM3, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    refused(cli(capsys, "plan", str(src), "--factor", "4", "--type", "dynamic"), "would replace it")


# --- architectures: a list of one or more class names (issue 16) ----------------------------------


@pytest.mark.parametrize("config", [
    *(_with(architectures=archs) for archs in ([], [""], ["  "], ["Llama\nForCausalLM"], ["LlamaForCausalLM", ""])),
    *({"architectures": ["SomeVLM"], key: _with(architectures=archs)}  # a nested model's own list
      for key, archs in (("text_config", 5), ("llm_config", []), ("language_config", [3]))),
])
@pytest.mark.parametrize("argv", [("plan",), ("patch",), ("serve", "--dry-run", "--gpu-memory", "80")])
def test_architectures_without_a_class_name_are_refused_before_anything(tmp_path, capsys, config, argv):
    """`"architectures": []` planned as "architecture None", and serve would have failed only when
    loading: refused in one line naming the field, nothing written."""
    src = make_model(tmp_path / "model", config)
    before = tree_state(tmp_path)
    err = refused(cli(capsys, argv[0], str(src), "--factor", "2", *argv[1:]), "config.json",
                  "architectures must be a list of one or more class names")
    assert "None" not in err and tree_state(tmp_path) == before
