"""Flag values: each check in launcher/rules/checks.py gives a value of its type in its range or one
BadOption, for any input; and `launch plan` driven in-process over generated flag values keeps the
contract (a plan, or exit 2 with one `launch: error:` line, no traceback, nothing written)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.rules import checks
from launcher.rules.checks import BadOption
from tests.conftest import LLAMA
from tests.unit.model.test_overlay import tree_digest

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["", " 1", "1e305", "-0", "²", "٣", "0x10", "nan", "inf", "1_000"]),
)


@given(ANY)
def test_whole_is_an_int_in_range_or_one_bad_option(value):
    try:
        result = checks.whole("--n", value, 1, 100)
    except BadOption as err:
        assert str(err).startswith("--n ") and "\n" not in str(err)
        return
    assert type(result) is int and 1 <= result <= 100


@given(ANY, st.booleans(), st.booleans())
def test_number_is_a_finite_float_in_range_or_one_bad_option(value, low_open, high_open):
    try:
        result = checks.number("--x", value, 0.0, 1.0, low_open=low_open, high_open=high_open)
    except BadOption as err:
        assert str(err).startswith("--x ") and "\n" not in str(err)
        return
    assert type(result) is float and math.isfinite(result)
    assert (0.0 < result if low_open else 0.0 <= result) and (result < 1.0 if high_open else result <= 1.0)


def test_the_ranges_name_their_ends():
    with pytest.raises(BadOption, match="from 1 to 64"):
        checks.whole("--tp", 65, 1, 64)
    with pytest.raises(BadOption, match="strictly between 0 and 1"):
        checks.number("--r", 1, 0, 1, low_open=True, high_open=True)
    assert checks.whole("--tp", "8", 1, 64) == 8 and checks.number("--g", "80", 0, 100) == 80.0
    with pytest.raises(BadOption, match="choose one of 0, 8, 4"):
        checks.one_of("--quant-policy", 2, (0, 8, 4))
    with pytest.raises(BadOption, match="control character"):
        checks.word("--model-name", "ma\x1bin", "a name")


@pytest.mark.parametrize("bad", ["", " main", "two words", "ma\x1bin", "a/../b", "a\\b", "/main", "main/", None, 3])
def test_one_revision_rule_for_plan_serve_patch_and_fetch(bad):
    with pytest.raises(BadOption, match="give a branch, tag or commit sha"):
        checks.revision("--revision", bad)
    assert checks.revision("--revision", "refs/pr/1") == "refs/pr/1" and checks.revision("-r", "v1.0") == "v1.0"


NUMBERISH = st.one_of(
    st.integers(-10, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "2", "4", "8", "0.5", "1e305", "-1", "nan", "", "abc", "²", "1e-300",
                     "+-2", "-+2", "++2", "+2", " 2 ", "2_0", "٣"]),
)
FLAGS = {
    "--factor": NUMBERISH, "--session-len": NUMBERISH, "--tp": NUMBERISH, "--max-batch-size": NUMBERISH,
    "--cache-max-entry-count": NUMBERISH, "--quant-policy": NUMBERISH, "--gpu-memory": NUMBERISH,
    "--replicas": NUMBERISH, "--nnodes": NUMBERISH,
}


@pytest.mark.parametrize("text", ["+-5", "-+5", "++5", "--5", "+", "-", "5-", "1 2", "٣", "5.0", "0x5"])
def test_whole_takes_one_sign_and_ascii_digits_only(text):
    with pytest.raises(BadOption, match="must be a whole number"):
        checks.whole("--trials", text, -10, 10)
    assert checks.whole("--trials", " +5 ", -10, 10) == 5 and checks.whole("--seed", "-5", -10, 10) == -5


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(FLAGS)), NUMBERISH, max_size=4))
def test_plan_over_generated_flags_plans_or_refuses_in_one_line(model_dir, tmp_path, monkeypatch, flags):
    from launcher.cli import main

    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    before = tree_digest(model_dir)
    argv = ["plan", str(model_dir), "--json"]
    for flag, value in flags.items():
        argv += [flag, value]
    if "--factor" not in flags:
        argv += ["--factor", "2"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main(argv)
    code = done.value.code
    if code == 0:
        data = json.loads(out.getvalue())
        assert 1 <= data["session_len"] <= 2**31 - 1 and data["engine"]["config"]["tp"] >= 1
    else:
        assert code == 2, err.getvalue()
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("launch: error: "), err.getvalue()
        assert out.getvalue() == ""
    assert tree_digest(model_dir) == before and not (tmp_path / "cache").exists()
    assert json.loads((model_dir / "config.json").read_text()) == LLAMA
