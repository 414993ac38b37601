"""Where the Hugging Face cache is: launch finds it exactly as the installed huggingface_hub does
(``HF_HUB_CACHE``, the legacy ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``, ``HOME``, with
``~`` and ``$VAR`` expanded in huggingface_hub's order), and no ``--out`` of patch, probe or ppl writes
into it, however it was named (issue 17, F1.1).

The reference is huggingface_hub itself: ``huggingface_hub.constants`` imported in a fresh interpreter
with the same environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.model import hubenv
from launcher.runtime import paths
from tests.conftest import LLAMA, REPO, assert_one_line_error, tree_state
from tests.support.probe_standin import ProbeStandin

pytestmark = pytest.mark.slow  # a fresh interpreter per example, the real CLI

# Every variable huggingface_hub 2.4's constants.py reads to place HF_HOME, the hub cache and the token
# file, and the ones their values may name ($V) or expand through (HOME for "~").
PLACE_VARS = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH")
HELPER_VARS = ("V", "W")


def clean_env(**env: str) -> dict[str, str]:
    """The test process's environment without any variable that places a cache, plus ``env``."""
    ours = ("HF_", "HUGGINGFACE_", "XDG_", "LAUNCH_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(ours) and k not in PLACE_VARS + HELPER_VARS}
    return {**base, **env}


HF_SAYS = ("import json, huggingface_hub.constants as c; "
           "print(json.dumps([c.HF_HOME, c.HF_HUB_CACHE, c.HF_TOKEN_PATH]))")


def huggingface_hub_places(env: dict[str, str], cwd: Path) -> list[Path]:
    done = subprocess.run([sys.executable, "-c", HF_SAYS], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=True)
    return [Path(p) for p in json.loads(done.stdout)]


def launch_places(env: dict[str, str]) -> list[Path]:
    with mock.patch.dict(os.environ, env, clear=True):
        return [paths.hf_home(), paths.hf_cache_dir(), paths.hf_token_path()]


WORD = st.text(st.sampled_from("ab-."), min_size=1, max_size=3)
VALUE = st.one_of(
    st.sampled_from(["", " ", "~", "~/", "/", ".", "~nosuchuser/x", "$NOSUCHVAR/x", "$HOME/x", "${HOME}", "$V",
                     "${V}/x", "$W/y", "~/$V", "$V/~", "%V%"]),
    st.builds(lambda a, b: f"/tmp/{a}/{b}", WORD, WORD),
    st.builds(lambda a: f"rel/{a}", WORD),
    st.builds(lambda a: f"~/{a}/", WORD),
    st.builds(lambda a, b: f"$V/{a}/{b}", WORD, WORD),
)
HELPER = st.sampled_from(["/tmp/v", "~/v", "$W/v", "$HOME", "rel", "", "~"])


@st.composite
def environments(draw) -> dict[str, str]:
    env = {}
    for var in PLACE_VARS:
        if draw(st.booleans()):
            env[var] = draw(st.sampled_from(["/tmp/home", "/tmp/a b", "/", "/tmp/home/"])) if var == "HOME" \
                else draw(VALUE)
    for var in HELPER_VARS:
        if draw(st.booleans()):
            env[var] = draw(HELPER)
    return env


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(env=environments())
def test_launch_places_the_cache_and_token_file_where_huggingface_hub_does(tmp_path_factory, env):
    cwd = tmp_path_factory.mktemp("cwd")
    full = clean_env(**env)
    assert launch_places(full) == huggingface_hub_places(full, cwd), env


def test_the_legacy_variable_names_the_cache_unless_hf_hub_cache_does(tmp_path):
    legacy, new = tmp_path / "legacy", tmp_path / "new"
    assert launch_places(clean_env(HOME=str(tmp_path), HUGGINGFACE_HUB_CACHE=str(legacy)))[1] == legacy
    assert launch_places(clean_env(HOME=str(tmp_path), HUGGINGFACE_HUB_CACHE=str(legacy),
                                   HF_HUB_CACHE=str(new)))[1] == new


# --- hubenv's checks cover every name ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["", " ", "\t"])
@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"])
def test_a_blank_cache_setting_is_refused_by_name(tmp_path, variable, value):
    with mock.patch.dict(os.environ, clean_env(HOME=str(tmp_path), **{variable: value}), clear=True), \
            pytest.raises(hubenv.BadHubSetting) as caught:
        hubenv.read()
    assert caught.value.variable == variable and caught.value.exit_code == 2
    assert "\n" not in str(caught.value)


def test_a_blank_xdg_cache_home_is_refused_only_where_huggingface_hub_reads_it(tmp_path):
    with mock.patch.dict(os.environ, clean_env(HOME=str(tmp_path), XDG_CACHE_HOME=""), clear=True), \
            pytest.raises(hubenv.BadHubSetting) as caught:
        hubenv.read()
    assert caught.value.variable == "XDG_CACHE_HOME"
    with mock.patch.dict(os.environ, clean_env(HOME=str(tmp_path), XDG_CACHE_HOME="", HF_HOME=str(tmp_path / "h")),
                         clear=True):
        assert hubenv.read().cache_dir == tmp_path / "h" / "hub"


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"])
def test_a_cache_setting_that_names_a_file_is_refused_by_its_name(tmp_path, variable):
    (tmp_path / "file").write_text("x")
    with mock.patch.dict(os.environ, clean_env(HOME=str(tmp_path), **{variable: str(tmp_path / "file")}),
                         clear=True), pytest.raises(hubenv.CacheNotADirectory) as caught:
        hubenv.read()
    assert caught.value.variable == variable and str(tmp_path / "file") in str(caught.value)


# --- no --out into the cache, however it is named ----------------------------------------------------


def ways(root: Path) -> dict[str, tuple[dict[str, str], Path]]:
    """Each way huggingface_hub can be pointed at a cache: (the environment, the cache it gives)."""
    home = root / "home"
    return {
        "HF_HUB_CACHE": ({"HOME": str(home), "HF_HUB_CACHE": str(root / "c")}, root / "c"),
        "HUGGINGFACE_HUB_CACHE": ({"HOME": str(home), "HUGGINGFACE_HUB_CACHE": str(root / "legacy")},
                                  root / "legacy"),
        "HUGGINGFACE_HUB_CACHE with ~": ({"HOME": str(home), "HUGGINGFACE_HUB_CACHE": "~/legacy"},
                                         home / "legacy"),
        "both, HF_HUB_CACHE first": ({"HOME": str(home), "HF_HUB_CACHE": str(root / "c"),
                                      "HUGGINGFACE_HUB_CACHE": str(root / "legacy")}, root / "c"),
        "HF_HOME": ({"HOME": str(home), "HF_HOME": str(root / "h")}, root / "h" / "hub"),
        "HF_HOME with $V": ({"HOME": str(home), "V": str(root), "HF_HOME": "$V/hv"}, root / "hv" / "hub"),
        "XDG_CACHE_HOME": ({"HOME": str(home), "XDG_CACHE_HOME": str(root / "x")}, root / "x" / "huggingface" / "hub"),
        "HOME": ({"HOME": str(home)}, home / ".cache" / "huggingface" / "hub"),
        "relative HF_HUB_CACHE": ({"HOME": str(home), "HF_HUB_CACHE": "rel/cache"}, root / "rel" / "cache"),
    }


WAYS = list(ways(Path("/")))


@pytest.fixture
def standin():
    with ProbeStandin(visible=5000, session_len=100_000) as server:
        yield server


def argv_for(command: str, root: Path, url: str, out: Path) -> list[str]:
    if command == "patch":
        return ["patch", str(root / "model"), "--factor", "2", "--out", str(out)]
    if command == "probe":
        return ["probe", "--url", url, "--lengths", "300", "--depths", "0", "--trials", "1", "--timeout", "5",
                "--out", str(out)]
    return ["ppl", "--url", url, "--lengths", "300,600", "--span", "100", "--timeout", "5", "--out", str(out)]


@pytest.mark.parametrize("where", ["snapshot", "root", "through a link", "not made yet"])
@pytest.mark.parametrize("command", ["patch", "probe", "ppl"])
@pytest.mark.parametrize("way", WAYS)
def test_no_out_inside_the_cache_however_it_is_named(tmp_path, standin, way, command, where):
    root = tmp_path
    env, cache = ways(root)[way]
    (root / "home").mkdir()
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(LLAMA))
    (root / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    full = clean_env(**env, LAUNCH_API_KEY="")
    assert root / huggingface_hub_places(full, root)[1] == cache  # the way does name this cache (from root)
    if where != "not made yet":
        (cache / "models--o--n" / "snapshots" / ("a" * 40)).mkdir(parents=True)
    out = {"snapshot": cache / "models--o--n" / "snapshots" / ("a" * 40) / "run", "root": cache,
           "through a link": root / "link" / "run", "not made yet": cache / "models--o--n" / "run"}[where]
    if where == "through a link":
        (root / "link").symlink_to(cache)
    before = tree_state(root)
    done = subprocess.run([sys.executable, "-m", "launcher", *argv_for(command, root, standin.url, out)],
                          env={**full, "PYTHONPATH": str(REPO)}, cwd=root, capture_output=True, text=True,
                          timeout=120, check=False)
    assert_one_line_error(done, "inside the Hugging Face cache", code=None if command == "patch" else 2)
    assert tree_state(root) == before
    assert not standin.prompts and not standin.ppl_inputs
