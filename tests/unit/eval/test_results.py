"""results.json is strict JSON: a number JSON cannot hold (a perplexity past exp(709) is inf) is null."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from launcher.eval.ppl.windows import perplexity
from launcher.eval.results import results_bytes

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.none(), st.text(max_size=5))
TREES = st.recursive(NUMBERS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                     max_leaves=20)


def refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def same_but_nonfinite_as_none(tree, read) -> bool:
    if isinstance(tree, float) and not math.isfinite(tree):
        return read is None
    if isinstance(tree, dict):
        return set(tree) == set(read) and all(same_but_nonfinite_as_none(tree[k], read[k]) for k in tree)
    if isinstance(tree, list):
        return len(tree) == len(read) and all(same_but_nonfinite_as_none(a, b) for a, b in zip(tree, read, strict=True))
    return tree == read


@given(tree=st.dictionaries(st.text(max_size=5), TREES, max_size=5))
def test_every_number_json_cannot_hold_is_written_as_null_and_the_rest_as_it_is(tree):
    read = json.loads(results_bytes(tree), parse_constant=refuse)  # Infinity / NaN would raise here
    assert same_but_nonfinite_as_none(tree, read)


def test_a_loss_past_709_has_no_perplexity_in_the_results():
    assert perplexity(800.0) == math.inf
    read = json.loads(results_bytes({"window_ppl": [perplexity(3.8), perplexity(800.0)]}), parse_constant=refuse)
    assert read == {"window_ppl": [math.exp(3.8), None]}
