"""Passkey prompts, scoring, filler sizing and flag parsing: the pure parts of ``launch probe``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.eval.probe.passkey import INTRO, QUESTION, Filler, build_prompt, is_correct, needle, passkey_for
from launcher.eval.probe.settings import ProbeSettings, parse_depths, parse_lengths, settings_from_flags
from launcher.eval.tokens import ProbeLengthTooShort, fit_words
from launcher.net.lmdeploy import normalize_url
from launcher.rules.checks import BadOption
from tests.conftest import REPO
from tests.support.probe_standin import tokenize

GRID = [(length, depth, trial) for length in (500, 4000) for depth in (0.0, 0.5, 1.0) for trial in range(3)]


def prompts(seed: int) -> list[str]:
    return [build_prompt(Filler(seed, t), passkey_for(seed, n, d, t), d, n // 2).text for n, d, t in GRID]


def test_same_seed_same_prompts_and_other_seed_other_passkeys():
    assert prompts(7) == prompts(7)
    keys_7 = [passkey_for(7, n, d, t) for n, d, t in GRID]
    keys_8 = [passkey_for(8, n, d, t) for n, d, t in GRID]
    assert all(a != b for a, b in zip(keys_7, keys_8, strict=True))
    assert len(set(keys_7)) == len(keys_7)  # every cell trial has its own passkey
    assert all(len(k) == 5 and k.isdigit() for k in keys_7)


def test_prompts_do_not_depend_on_the_interpreter_run():
    """str hashing is randomised per process; the prompts must not be."""
    code = ("from launcher.eval.probe.passkey import Filler, build_prompt, passkey_for;"
            "print(build_prompt(Filler(3, 1), passkey_for(3, 900, 0.25, 1), 0.25, 300).text)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}, cwd=REPO).stdout for h in (1, 2)}
    here = build_prompt(Filler(3, 1), passkey_for(3, 900, 0.25, 1), 0.25, 300).text
    assert outs == {here + "\n"}


def test_depth_places_the_passkey_line_from_start_to_end():
    filler = Filler(0, 0)
    line = needle("12345")
    start = build_prompt(filler, "12345", 0.0, 400).text
    end = build_prompt(filler, "12345", 1.0, 400).text
    middle = build_prompt(filler, "12345", 0.5, 400)
    assert start.startswith(f"{INTRO}\n\n{line} ")
    assert end.endswith(f" {line}\n\n{QUESTION}")
    assert 150 <= middle.needle_word <= 250
    assert middle.text.count("12345") == 2  # in the line only: the filler holds no digits
    body = build_prompt(filler, "00000", 0.5, 5000).text
    assert not any(ch.isdigit() for ch in body.replace("00000", ""))
    # The line sits at a sentence boundary: the word before it ends a sentence.
    before = middle.text.split(line)[0].rstrip()
    assert before.endswith(".")


def test_filler_is_a_stream_longer_prompts_extend_shorter_ones():
    assert Filler(5, 2).words(300) == Filler(5, 2).words(900)[:300]
    assert Filler(5, 2).words(50) != Filler(5, 3).words(50)


@pytest.mark.parametrize(("answer", "right"), [
    ("The pass key is 48213.", True),
    ("48213", True),
    ("pass key: 48213!", True),
    ("The pass key is 482130.", False),
    ("148213", False),
    ("4821", False),
    ("", False),
    ("I do not know, banana.", False),
])
def test_scoring_needs_the_exact_passkey_as_a_whole_number(answer, right):
    assert is_correct("48213", answer) is right


def standin_count(passkey: str, depth: float, filler: Filler):
    return lambda n: len(tokenize(build_prompt(filler, passkey, depth, n).text))


@pytest.mark.parametrize("target", [120, 777, 2000, 9000])
def test_fit_hits_the_target_in_the_models_tokens_with_few_counts(target):
    calls = []
    count = standin_count("55555", 0.5, Filler(1, 0))

    def counting(n):
        calls.append(n)
        return count(n)

    fit = fit_words(counting, target)
    assert fit.tokens == count(fit.words) <= target
    assert count(fit.words + 1) > target or fit.tokens == target
    assert target - fit.tokens <= 2
    assert len(calls) == fit.requests <= 12


@settings(max_examples=60, deadline=None)
@given(base=st.integers(1, 80), rate=st.floats(0.3, 4.0), target=st.integers(1, 200_000),
       lumpy=st.integers(0, 7))
def test_fit_finds_the_most_filler_that_fits(base, rate, target, lumpy):
    """For any monotone count: count(result) <= target, and one more word would pass it (or it is exact)."""
    def count(n):
        return base + int(n * rate) + (n // 5 if lumpy else 0) * lumpy

    if base > target:
        with pytest.raises(ProbeLengthTooShort):
            fit_words(count, target)
        return
    fit = fit_words(count, target)
    assert count(fit.words) == fit.tokens <= target
    assert fit.tokens == target or count(fit.words + 1) > target


def test_a_target_shorter_than_the_question_is_refused():
    with pytest.raises(ProbeLengthTooShort) as info:
        fit_words(standin_count("11111", 0.0, Filler(0, 0)), 20)
    assert info.value.minimum > 20 and "at least" in str(info.value)


def test_lengths_in_tokens_k_m_and_multiples():
    """k is 1,024 and m 1,048,576 (the one length grammar of --context and --session-len)."""
    assert parse_lengths("500, 2k,1.5x,2x", 32768) == (500, 2048, 49152, 65536)
    assert parse_lengths("1.5k,1M,0.5m", None) == (1536, 1048576, 524288)
    for bad in ("0.3k", "2kk", "1_0k"):
        with pytest.raises(BadOption, match="not a whole token count"):
            parse_lengths(bad, 32768)
    assert parse_depths("0,0.5,1") == (0.0, 0.5, 1.0)
    s = settings_from_flags(url=None, model=None, api_key=None, lengths=None, depths=None, trials=None, seed=None,
                            native="4096", tokenizer=None, timeout=None, max_tokens=None, min_accuracy=None)
    assert s.lengths == (2048, 4096, 6144, 8192) and s.native_context == 4096
    assert s.url == "http://127.0.0.1:23333" and s.trials == 3 and s.depths == (0.0, 0.25, 0.5, 0.75, 1.0)


FLAGS: dict[str, str | None] = {
    "url": None, "model": None, "api_key": None, "lengths": "1000", "depths": None, "trials": None, "seed": None,
    "native": None, "tokenizer": None, "timeout": None, "max_tokens": None, "min_accuracy": None,
}


@pytest.mark.parametrize(("flag", "value", "option"), [
    ("lengths", "abc", "--lengths"),
    ("lengths", "2x", "--lengths"),  # a multiple without a native context
    ("lengths", "1000,,2000", "--lengths"),
    ("lengths", "0", "--lengths"),
    ("lengths", None, "--lengths"),  # no lengths and no native context
    ("depths", "1.5", "--depths"),
    ("depths", "-0.1", "--depths"),
    ("depths", "half", "--depths"),
    ("trials", "0", "--trials"),
    ("trials", "2.5", "--trials"),
    ("trials", "1001", "--trials"),  # every number from a flag has a range (launcher/rules/checks.py)
    ("seed", "-1", "--seed"),
    ("seed", "99999999999999999999", "--seed"),
    ("native", "0", "--native"),
    ("timeout", "0", "--timeout"),
    ("timeout", "soon", "--timeout"),
    ("timeout", "1e309", "--timeout"),
    ("min_accuracy", "1.2", "--min-accuracy"),
    ("max_tokens", "0", "--max-tokens"),
    ("url", "ftp://host:1", "--url"),
    ("url", "http://host:99999", "--url"),
    ("tokenizer", "/no/such/dir", "--tokenizer"),
])
def test_bad_flags_name_the_flag_and_exit_2(flag, value, option):
    with pytest.raises(BadOption) as info:
        settings_from_flags(**{**FLAGS, flag: value})
    assert info.value.option == option and info.value.exit_code == 2
    assert "\n" not in str(info.value) and str(info.value).startswith(option)


def test_settings_checks_apply_to_library_callers_too():
    with pytest.raises(BadOption):
        ProbeSettings(lengths=(1000,), depths=(2.0,))
    with pytest.raises(BadOption):
        ProbeSettings(lengths=())
    s = ProbeSettings(lengths=(2000, 500, 2000), depths=(1, 0), api_key="secret")
    assert s.lengths == (500, 2000) and s.depths == (0.0, 1.0)
    assert "secret" not in repr(s) and "secret" not in str(s.public())


@pytest.mark.parametrize(("given_url", "expected"), [
    ("127.0.0.1:23333", "http://127.0.0.1:23333"),
    ("http://127.0.0.1:23333/", "http://127.0.0.1:23333"),
    ("http://gpu-box:8000/v1", "http://gpu-box:8000"),
    ("https://example.org/llm/v1/", "https://example.org/llm"),
])
def test_urls_are_normalised_to_the_server_root(given_url, expected):
    assert normalize_url(given_url) == expected


def test_default_lengths_leave_room_for_the_template_and_answer_in_the_session():
    from launcher.eval.probe.settings import default_lengths

    assert default_lengths(32768) == (16384, 32768, 49152, 65536)
    capped = default_lengths(32768, session_len=65536, max_tokens=64)
    assert capped[:3] == (16384, 32768, 49152) and 65536 - 64 - 256 <= capped[3] < 65536 - 64
    assert default_lengths(1000, session_len=1200) == (500, 1000, 1008)


def test_depth_labels_keep_the_precision_given():
    from launcher.eval.probe.labels import depth_label

    assert [depth_label(d) for d in (0.0, 0.5, 0.125, 1.0)] == ["0.00", "0.50", "0.125", "1.00"]
