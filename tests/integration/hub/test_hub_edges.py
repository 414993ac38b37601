"""Edges of the model source (issue 17), against the tests' own hub on 127.0.0.1 (tests/support/fakehub.py)
and the real huggingface_hub client:

* every Hugging Face setting launch or its README names is checked before huggingface_hub reads it:
  a bad value is one line naming the variable, exit 2, no request, nothing written;
* a hub that trickles its answers (a real socket server sending one byte at a time) is cut off by
  one overall deadline, in every command that reaches the hub;
* no password of HF_ENDPOINT and no token appears in any message;
* revisions are resolved offline through huggingface_hub's public API (issue 16), and ``plan`` on
  a preset that is not cached does not even import huggingface_hub.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
import urllib.parse
from pathlib import Path
from unittest import mock

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.model import hubenv
from launcher.model.hub import fetch, read_config
from launcher.model.hubcall import GatedRepo, HubUnreachable, RepoNotFound, RevisionNotFound
from launcher.runtime.paths import hf_cache_dir, repo_folder
from tests.conftest import REPO, assert_one_line_error, run_launch, tree_state, user_presets
from tests.support.fakehub import FakeHub, tiny_repo_files

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

WEEK = hubenv.WEEK_S
ENV_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30)
ONCE = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def settings_with(**env: str):
    """``hubenv.read()`` with ``env`` set over a clean environment of Hugging Face variables."""
    ours = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    clean["HF_HOME"] = os.environ["HF_HOME"]
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return hubenv.read()


def refusal(variable: str, **env: str) -> str:
    """The one-line message ``hubenv.read()`` refuses ``env`` with, naming ``variable``."""
    with pytest.raises(hubenv.BadHubSetting) as caught:
        settings_with(**env)
    message = str(caught.value)
    assert caught.value.variable.startswith(variable) and caught.value.exit_code == 2
    assert "\n" not in message and "\r" not in message
    return message


# --- settings: whatever the value, refused in one line or read as huggingface_hub reads it ------------


FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
SECONDS_LIKE = st.one_of(
    ENV_TEXT,
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-10**9, 10**12).map(str),
    st.integers(1, 10**5).map(lambda n: str(n).translate(FULLWIDTH)),
    st.integers(10, 10**5).map(lambda n: "_".join(str(n))),
    st.integers(1, WEEK).map(lambda n: f" +{n:07d} "),
)


@pytest.mark.parametrize("variable", ["HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"])
@ONCE
@given(value=SECONDS_LIKE)
def test_timeout_settings_are_refused_or_read_as_huggingface_hub_reads_them(variable, value):
    """huggingface_hub reads both with ``int(value)`` at import (``1.5`` or ``nan`` is a traceback,
    ``0`` silently means its default): accepted means int() gives that number, from 1 s to a week."""
    try:
        read = settings_with(**{variable: value})
    except hubenv.BadHubSetting:
        refusal(variable, **{variable: value})
        return
    got = read.download_timeout if variable == "HF_HUB_DOWNLOAD_TIMEOUT" else read.etag_timeout
    assert value.isascii() and got == int(value) and 1 <= got <= WEEK


@ONCE
@given(value=st.one_of(ENV_TEXT, st.sampled_from(["1", "0", "true", "FALSE", "yes", "No", "on", " 1"])))
def test_offline_settings_are_refused_or_read_as_huggingface_hub_reads_them(value):
    try:
        read = settings_with(HF_HUB_OFFLINE=value)
    except hubenv.BadHubSetting:
        refusal("HF_HUB_OFFLINE", HF_HUB_OFFLINE=value)
        return
    word = value.strip().upper()
    yes, no = ("1", "ON", "YES", "TRUE"), ("", "0", "OFF", "NO", "FALSE")
    assert word in yes + no and read.offline is (word in yes)


# Passwords of every character class a URL must or may encode (framed so that they cannot be words
# of the message by chance).
PASSWORDS = st.text(st.sampled_from("abcXYZ0189-._~!$&'()*+,;=:@%/?# é"), max_size=12).map(
    lambda t: f"Zq{t}9Y")


URL_TEXT = st.text(st.sampled_from("aZ09-._~%!$&'()*+,;=:@/[]? #\x1bé"), max_size=8)


GOOD_HOSTS = ["127.0.0.1", "hf-mirror.com", "my_host", "h.", "[::1]", "[2001:db8::7]", "xn--mrror-kva.com",
              "a" * 63]
BAD_HOSTS = ["[fe80::1%25eth0]", "[::1", "::1", "256.1.1.1", "1.2.3.4.5", "123", "-a.com", "a..b",
             "mïrror.com", "",
             "[zz]", "a" * 64, "h h"]


@st.composite
def endpoints(draw) -> tuple[str, str]:
    """(HF_ENDPOINT, its password): half of them URLs of good parts (percent-encoded user info, any
    port of 1..65535, a path), the rest with any part bad, or plain text."""
    if draw(st.integers(0, 5)) == 0:
        return draw(ENV_TEXT), ""
    good = draw(st.booleans())
    scheme = draw(st.sampled_from(["http://", "https://", "HTTPS://"] if good else
                                  ["http://", "ftp://", "http:/", "", "http://http://"]))
    password = draw(st.one_of(st.just(""), PASSWORDS))
    userinfo = f"user:{urllib.parse.quote(password, safe='') if good else password}@" if password else ""
    any_host = st.one_of(st.sampled_from(GOOD_HOSTS + BAD_HOSTS),
                         st.text(st.sampled_from("ab9-._[]:%"), max_size=10))
    host = draw(st.sampled_from(GOOD_HOSTS) if good else any_host)
    port = draw(st.one_of(st.just(""), st.integers(1, 65535).map(lambda n: f":{n}")) if good else
                st.one_of(st.just(""), st.integers(-2, 70000).map(lambda n: f":{n}"),
                          URL_TEXT.map(lambda t: ":" + t)))
    path = draw(st.text(st.sampled_from("az09-._~/"), max_size=8).map(lambda t: "/" + t) if good else
                st.one_of(st.just(""), URL_TEXT.map(lambda t: "/" + t)))
    return scheme + userinfo + host + port + path, password


@ONCE
@given(case=endpoints())
def test_an_endpoint_is_refused_or_usable_by_huggingface_hub_and_its_http_client(case):
    """Accepted: the reads huggingface_hub makes of HF_ENDPOINT at import (``urlsplit(...).hostname``,
    ``urlparse(...).port``) work, and its HTTP client sends ``/api/...`` to that same host and port.
    Refused: one line, and the password is not in it."""
    value, password = case
    try:
        read = settings_with(HF_ENDPOINT=value)
    except hubenv.BadHubSetting:
        message = refusal("HF_ENDPOINT", HF_ENDPOINT=value)
        assert not password or password not in message
        return
    if not value.strip():
        assert read.endpoint == hubenv.DEFAULT_ENDPOINT
        return
    split = urllib.parse.urlsplit(value)
    port = urllib.parse.urlparse(value).port or {"http": 80, "https": 443}[split.scheme.lower()]
    url = httpx2.URL(read.endpoint + "/api/models/org/tiny")
    assert url.raw_host.decode("ascii").lower() == split.hostname
    assert (url.port or {"http": 80, "https": 443}[url.scheme]) == port
    assert url.path.endswith("/api/models/org/tiny") and not url.query


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(token=ENV_TEXT)
def test_a_token_is_refused_unseen_or_sent_as_huggingface_hub_sends_it(token):
    """Accepted: huggingface_hub's own headers with it go through a real request to a server on
    127.0.0.1 (a non-ASCII token was a UnicodeEncodeError there). Refused: the token is not shown."""
    try:
        read = settings_with(HF_TOKEN=token)
    except hubenv.BadHubSetting:
        message = refusal("HF_TOKEN", HF_TOKEN=token)
        assert hubenv.HIDDEN in message and (len(token.strip()) < 4 or token.strip() not in message)
        return
    from huggingface_hub.utils import build_hf_headers

    assert read.token == (token.replace("\r", "").replace("\n", "").strip() or None)
    with FakeHub() as server, httpx2.Client() as client:
        answer = client.get(server.url + "/api/models/org/none", headers=build_hf_headers(token=read.token))
        assert answer.status_code == 404
        assert server.requests()[0].authorization == (f"Bearer {read.token}" if read.token else None)


@pytest.mark.parametrize(("where", "content"), [
    ("file", b"h\xe9llo"), ("file", "t\u00f6ken".encode()), ("file", b"a\x1bb"), ("directory", b""),
])
def test_a_bad_token_file_is_one_line_that_does_not_show_it(tmp_path, where, content):
    path = tmp_path / "token"
    if where == "directory":
        path.mkdir()
    else:
        path.write_bytes(content)
    message = refusal("HF_TOKEN_PATH", HF_TOKEN_PATH=str(path))
    assert str(path) in message and (not content or content.decode("latin-1") not in message)
    assert settings_with(HF_TOKEN_PATH=str(path), HF_TOKEN="hf_good").token == "hf_good"  # HF_TOKEN first


# The cases and variants of each shape, through the real CLI.
MALFORMED = [
    ("HF_HUB_DOWNLOAD_TIMEOUT", "1.5"), ("HF_HUB_DOWNLOAD_TIMEOUT", "abc"),
    ("HF_HUB_DOWNLOAD_TIMEOUT", "nan"),
    ("HF_HUB_ETAG_TIMEOUT", "abc"), ("HF_ENDPOINT", "http://[::1"), ("HF_ENDPOINT", "http://h:99999"),
    ("HF_HUB_DOWNLOAD_TIMEOUT", "inf"), ("HF_HUB_DOWNLOAD_TIMEOUT", "-1"), ("HF_HUB_DOWNLOAD_TIMEOUT", "0"),
    ("HF_HUB_DOWNLOAD_TIMEOUT", ""), ("HF_HUB_DOWNLOAD_TIMEOUT", "１０"), ("HF_HUB_ETAG_TIMEOUT", "1e3"),
    ("HF_HUB_ETAG_TIMEOUT", "1_0"), ("HF_ENDPOINT", "ftp://mirror"), ("HF_ENDPOINT", "hf-mirror.com"),
    ("HF_ENDPOINT", "http://h:0"), ("HF_ENDPOINT", "http://h/?x=1"), ("HF_ENDPOINT", "http://[::1]:65536"),
    ("HF_ENDPOINT", "http://256.0.0.1"), ("HF_ENDPOINT", "http://mïrror"), ("HF_TOKEN", "t\u00f6ken"),
    ("HF_TOKEN", "hf_a\x1bb"), ("HF_HUB_OFFLINE", "maybe"), ("TRANSFORMERS_OFFLINE", "2"), ("HF_HOME", ""),
    ("HF_HUB_CACHE", " "), ("HF_TOKEN_PATH", ""),
]


@pytest.mark.parametrize(("variable", "value"), MALFORMED)
def test_malformed_settings_are_one_line_before_any_request_or_write(hub, isolated_env, variable, value):
    home = isolated_env / "hf"
    assert run_launch("fetch", "org/tiny", "-q").returncode == 0
    before = tree_state(home)
    hub.reset()
    for argv in (["fetch", "org/tiny"], ["plan", "org/tiny", "--factor", "2"]):
        done = run_launch(*argv, env={variable: value})
        assert_one_line_error(done, variable, "cannot be used", code=2)
        assert (value not in done.stderr) if variable == "HF_TOKEN" else True
    assert hub.count() == 0 and tree_state(home) == before


@pytest.mark.parametrize("argv", [["patch", "org/tiny", "--factor", "2"],
                                  ["serve", "org/tiny", "--factor", "2", "--dry-run", "--gpu-memory", "24"]])
def test_patch_and_serve_refuse_a_malformed_setting_too(hub, tmp_path, argv):
    done = run_launch(*argv, env={"HF_HUB_DOWNLOAD_TIMEOUT": "1.5", "LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(done, "HF_HUB_DOWNLOAD_TIMEOUT '1.5'", code=2)
    assert hub.count() == 0 and not (tmp_path / "c").exists()


# --- a hub that trickles: one overall deadline ---------------------------------------------------------
# Through the real CLI in its own process: a request left trickling in a daemon thread of the test
# process would outlive its test (and huggingface_hub's shared HTTP client with it).


def trickling(path_part: str, method: str | None = None):
    return lambda m, p: path_part in p and (method is None or m == method)


def run_with_deadline(hub, *argv: str, seconds: int = 2, password: str = "S3cret-pw", cut: bool = True):
    """``launch ARGV`` with LAUNCH_HUB_TIMEOUT=seconds and a password in HF_ENDPOINT; it must end
    with one line long before the trickle would (minutes), and (``cut``: it ended mid-answer) the hub
    sees its connection close."""
    started = time.monotonic()
    env = {"LAUNCH_HUB_TIMEOUT": str(seconds), "HF_ENDPOINT": with_password(hub.url, password),
           "LAUNCH_CACHE_DIR": os.environ["HOME"] + "/launch"}
    done = run_launch(*argv, env=env, timeout=180)
    assert time.monotonic() - started < seconds + 30
    url = f"http://***@127.0.0.1:{hub.port}"
    assert_one_line_error(done, f"hub at {url} gave no complete answer in {seconds} s")
    assert password not in done.stderr
    end = time.monotonic() + 10
    while cut and not hub.hangups and time.monotonic() < end:
        time.sleep(0.05)
    assert hub.hangups or not cut  # the hub saw the client go
    return done


@pytest.mark.parametrize(("path_part", "method", "pinned", "doing"), [
    ("/revision/", None, False, "resolving org/tiny@main"),
    ("/tree/", None, True, "listing the files of org/tiny@"),
    ("/resolve/", "HEAD", False, "downloading org/tiny@main"),
    ("/resolve/", "GET", False, "downloading org/tiny@main"),
], ids=["branch lookup", "file list", "HEAD of a file", "body of a file"])
def test_a_trickling_hub_ends_fetch_at_the_deadline(hub, path_part, method, pinned, doing):
    """Each answer is sent in full, one byte every 50 ms: at least 10 s even for the smallest, so a
    per-read timeout never trips. The deadline (2 s) ends it long before that."""
    sha = hub.repos["org/tiny"].refs["main"]
    hub.trickle(trickling(path_part, method))
    done = run_with_deadline(hub, "fetch", "org/tiny", *(["--revision", sha] if pinned else []))
    assert f"while {doing}" in done.stderr


def test_a_trickled_branch_lookup_falls_back_to_a_complete_cache(hub):
    """As with a hub that cannot be reached: after the deadline the complete cache answers, and the
    summary says why (without the password)."""
    first = run_launch("fetch", "org/tiny", "-q")
    assert first.returncode == 0, first.stderr
    hub.trickle(trickling("/revision/"))
    started = time.monotonic()
    again = run_launch("fetch", "org/tiny", "--timeout", "2",
                       env={"HF_ENDPOINT": with_password(hub.url, "S3cret-pw")}, timeout=120)
    assert time.monotonic() - started < 30
    assert again.returncode == 0 and again.stdout == first.stdout and "S3cret" not in again.stderr
    assert f"from cache: the hub at http://***@127.0.0.1:{hub.port} did not answer within 2 s" in again.stderr


@pytest.mark.parametrize("argv", [
    ["plan", "org/tiny", "--factor", "2"],
    ["patch", "org/tiny", "--factor", "2"],
    ["serve", "org/tiny", "--factor", "2", "--dry-run", "--gpu-memory", "24"],
])
def test_every_command_on_a_trickling_hub_ends_at_the_deadline_writing_nothing(hub, isolated_env, argv):
    hub.trickle(lambda m, p: True)
    run_with_deadline(hub, *argv)
    assert tree_state(isolated_env / "hf") is None and tree_state(isolated_env / "launch") is None


def test_the_metadata_shares_one_deadline(hub):
    """Every metadata answer is trickled over 2.6 s: launch's branch lookup (one request) and
    huggingface_hub's listing (the branch again, then the file list) each fit the 6 s deadline, so a
    deadline per call would let both through; the three answers together take 7.8 s."""
    hub.trickle(lambda m, p: "/api/models/" in p, over=2.6)
    done = run_with_deadline(hub, "fetch", "org/tiny", seconds=6, cut=False)
    assert "while listing the files of org/tiny@main" in done.stderr  # the first call had ended
    assert hub.count(contains="/revision/") == 2


def test_a_trickle_that_completes_within_the_deadline_is_fine(hub):
    """The deadline bounds a whole answer, not its pace: slow but complete answers are taken."""
    hub.trickle(lambda m, p: "/api/models/" in p, every=0.0005)
    done = run_launch("fetch", "org/tiny", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.splitlines()[-1]).name == hub.repos["org/tiny"].refs["main"]
    assert hub.count(contains="/api/models/") >= 2 and "downloaded" in done.stderr


# --- secrets: no password of HF_ENDPOINT, no token, in any message -------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_password(url: str, password: str) -> str:
    return url.replace("http://", f"http://user:{urllib.parse.quote(password, safe='')}@")


FAILURES = {
    "repo not found": (RepoNotFound, lambda hub: fetch("org/missing", timeout_s=5)),
    "revision not found": (RevisionNotFound, lambda hub: fetch("org/tiny", revision="nope", timeout_s=5)),
    "gated": (GatedRepo, lambda hub: fetch("org/gated", timeout_s=5)),
    "config of a missing repo": (RepoNotFound, lambda hub: read_config("org/missing", timeout_s=5)),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(password=PASSWORDS)
def test_no_message_carries_the_endpoint_password(hub, failure, password):
    """The message still names the hub's address (it did carry the URL); the password, as written or
    percent-encoded, is in neither the message nor the debug traceback."""
    kind, call = FAILURES[failure]
    hub.add_repo("org/gated", tiny_repo_files(), gated=True)
    endpoint = {"HF_ENDPOINT": with_password(hub.url, password)}
    with mock.patch.dict(os.environ, endpoint), pytest.raises(kind) as caught:
        call(hub)

    shown = str(caught.value) + repr(caught.value) + "".join(traceback.format_exception(caught.value))
    assert f"127.0.0.1:{hub.port}" in str(caught.value)
    assert password not in shown and urllib.parse.quote(password, safe="") not in shown


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(password=PASSWORDS)
def test_an_unreachable_hub_names_its_address_without_the_password(password):
    url = with_password(f"http://127.0.0.1:{closed_port()}", password)
    with mock.patch.dict(os.environ, {"HF_ENDPOINT": url}), pytest.raises(HubUnreachable) as caught:
        fetch("org/tiny", timeout_s=5)
    assert "127.0.0.1:" in str(caught.value) and "***@" in str(caught.value)
    message = str(caught.value)
    assert password not in message and urllib.parse.quote(password, safe="") not in message


def test_huggingface_hubs_own_warnings_and_the_summary_carry_no_password(hub, monkeypatch):
    """huggingface_hub prints the URL it resumes (a body cut mid-way) and launch's summary names an
    unreachable hub: both through the redaction, as are the debug traceback and the result's note."""
    monkeypatch.setenv("HF_ENDPOINT", with_password(hub.url, "S3cret-pw"))
    for argv, cut in ((["plan", "org/tiny", "--factor", "2"], "config.json"),
                      (["fetch", "org/tiny"], "tokenizer.json")):
        hub.drop_once(cut)
        done = run_launch(*argv)
        assert done.returncode == 0, done.stderr
        assert "Error while downloading from http://***@127.0.0.1" in done.stderr
        assert "S3cret" not in done.stderr
    hub.stop()
    again = run_launch("fetch", "org/tiny")
    assert again.returncode == 0 and "S3cret" not in again.stderr
    assert f"from cache: the hub at http://***@127.0.0.1:{hub.port} cannot be reached" in again.stderr
    debug = run_launch("fetch", "org/never", env={"LAUNCH_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "S3cret" not in debug.stderr


@pytest.mark.parametrize("text", [
    "GET https://user:pw1234@mirror/api/x failed", "Authorization: Bearer hf_" + "a" * 34,
    "basic auth at http://a:b@h:1/ and https://u@h/x", "token hf_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef12 leaked",
])
def test_redact_takes_out_user_info_and_token_shapes(text):
    clean = hubenv.redact(text)
    assert "pw1234" not in clean and "a" * 34 not in clean and "a:b@" not in clean and "u@h" not in clean
    assert "ABCDEFGHIJ" not in clean and clean.count("***") >= 1


# --- revisions resolved offline through huggingface_hub's public API -------------------------------------


PRESET = ("name: tiny\nrepo: org/tiny\nnative_context: 256\nrope: {type: dynamic, factor: 2.0}\n"
          "parameters: 1.0e4\nconfig: {architectures: [LlamaForCausalLM], model_type: llama,"
          " max_position_embeddings: 256, rope_theta: 10000, num_hidden_layers: 1, hidden_size: 16,"
          " num_attention_heads: 2, num_key_value_heads: 1, torch_dtype: float32}\n")


PLAN_IMPORTS = ("import json, sys\nfrom launcher.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
                "    print('HUB=' + json.dumps('huggingface_hub' in sys.modules), file=sys.stderr)\n")


def plan_source(*argv: str) -> tuple[str, bool]:
    """(where `launch plan --json` took the config from, whether huggingface_hub was imported)."""
    done = subprocess.run([sys.executable, "-c", PLAN_IMPORTS, "plan", *argv, "--json"], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout)["config_source"], json.loads(done.stderr.split("HUB=")[-1])


def test_plan_reads_the_cached_snapshot_through_huggingface_hub_and_skips_it_when_nothing_is_cached(
        hub, tmp_path, monkeypatch):
    user_presets(tmp_path, monkeypatch, tiny=PRESET)
    source, imported = plan_source("tiny")
    assert source.startswith("preset tiny") and imported is False  # nothing cached: not even imported
    sha = fetch("org/tiny").commit_sha
    hub.stop()
    source, imported = plan_source("tiny")
    assert source.endswith(f"snapshots/{sha}/config.json") and imported is True


@pytest.mark.parametrize("ref", ["../../../../etc", "0" * 40, b"\xff\xfe", "dir", "", f"{'a' * 40}/../x"])
def test_a_hand_edited_ref_is_no_snapshot(hub, tmp_path, monkeypatch, ref):
    """huggingface_hub's lookup follows refs/main; one that names no commit folder of this repo's
    snapshots (a path out of it, an unknown commit, bytes, a folder) means nothing is cached."""
    user_presets(tmp_path, monkeypatch, tiny=PRESET)
    fetch("org/tiny")
    path = hf_cache_dir() / repo_folder("org/tiny") / "refs" / "main"
    path.unlink()
    if ref == "dir":
        path.mkdir()
    else:
        path.write_bytes(ref if isinstance(ref, bytes) else ref.encode())
    source, _ = plan_source("tiny")
    assert source.startswith("preset tiny")


def test_no_launcher_module_reads_the_caches_refs_by_hand():
    """A string "refs" (or "refs/...") as a path part in launch's code: huggingface_hub's to read."""
    import ast

    offenders = [f"{p.relative_to(REPO)}:{node.lineno}" for p in sorted((REPO / "launcher").rglob("*.py"))
                 for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and re.fullmatch(r"refs(/.*)?", node.value)]
    assert offenders == []
