"""docker/Dockerfile against the project it packages, read as text (nothing here can build an image):

(a) the base is openmmlab/lmdeploy at the tag of the lmdeploy release pyproject.toml pins (`lmdeploy==X.Y.Z`);
(b) every file and folder it COPYs exists and is not left out of the build context by .dockerignore;
(c) .dockerignore keeps .venv, .git, the tests and caches out of the build context;
(d) its ENTRYPOINT is launch's console script (pyproject's [project.scripts]), in exec form;
(e) its version label is pyproject's version.

Each check is a function of texts that returns the problems it finds; the tests at the end run each one on a
deliberately broken Dockerfile, pyproject or .dockerignore, so none of them passes whatever it is given.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"

BASE_IMAGE = "openmmlab/lmdeploy"
# lmdeploy's release workflow (.github/workflows/docker.yml): <git tag>-<CUDA suffix>, e.g. v0.18.0-cu12.8.
RELEASE_TAG = re.compile(r"v(?P<version>\d+\.\d+\.\d+(?:\.post\d+)?)-(?P<cuda>cu\d+(?:\.\d+)?)")


# ---- reading a Dockerfile ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts (1-based)


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: comment lines dropped (inside a continuation too, as Docker does),
    lines ending in a backslash joined to the next, heredoc bodies (``<<EOF`` ... ``EOF``) kept out."""
    found: list[Instruction] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, parts = i, []
        while i < len(lines):
            line = lines[i]
            i += 1
            if line.strip().startswith("#"):
                continue
            if line.rstrip().endswith("\\"):
                parts.append(line.rstrip()[:-1])
                continue
            parts.append(line)
            break
        logical = " ".join(p.strip() for p in parts).strip()
        if not logical:
            continue
        keyword, _, args = logical.partition(" ")
        for heredoc in re.finditer(r"<<-?\s*[\"']?(\w+)[\"']?", args):
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        found.append(Instruction(keyword.upper(), args.strip(), start + 1))
    return found


def _last(text: str, keyword: str) -> Instruction | None:
    matching = [ins for ins in instructions(text) if ins.keyword == keyword]
    return matching[-1] if matching else None


def base_image(text: str) -> tuple[str, str]:
    """(image, tag) of the final stage's FROM; tag "" when none is given."""
    ins = _last(text, "FROM")
    if ins is None:
        return "", ""
    words = [w for w in ins.args.split() if not w.startswith("--")]  # --platform=...
    ref = words[0].split("@", 1)[0]
    name, colon, tag = ref.rpartition(":")
    if not colon or "/" in tag:  # a registry's port (host:5000/name), not a tag
        return ref, ""
    return name, tag


def _exec_form(args: str) -> list[str] | None:
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def copy_sources(text: str) -> list[tuple[int, str]]:
    """(line, source) of every COPY / ADD from the build context (not those --from another stage or image)."""
    sources = []
    for ins in instructions(text):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = _exec_form(ins.args) or shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources.extend((ins.line, w) for w in words[:-1])
    return sources


def labels(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for ins in instructions(text):
        if ins.keyword == "LABEL":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                found[key] = value
    return found


# ---- .dockerignore, as Docker reads it (moby's patternmatcher) -----------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":  # a character class, as Go's filepath.Match: [abc], [^abc], [a-z]
            end = pattern.find("]", i + 1)
            if end < 0:
                out += re.escape(ch)
            else:
                out += "[" + pattern[i + 1:end].replace("\\", "\\\\") + "]"
                i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out)


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) per line: blank lines and ``#`` comments skipped, ``!`` re-includes, each
    pattern cleaned as a relative path (``/x/`` is ``x``)."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        line = line.lstrip("!").strip()
        cleaned = posixpath.normpath(line).lstrip("/")
        if cleaned in ("", "."):
            continue
        rules.append((excludes, _pattern_regex(cleaned)))
    return rules


def ignored(dockerignore: str, path: str) -> bool:
    """Whether the build context leaves out ``path`` (relative, '/'-separated): the last pattern that
    matches it or one of its parent folders decides."""
    parts = posixpath.normpath(path).split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for excludes, regex in ignore_rules(dockerignore):
        if regex.fullmatch(candidates[-1]) or any(regex.fullmatch(c) for c in candidates[:-1]):
            result = excludes
    return result


# ---- pyproject ----------------------------------------------------------------------------------------------

class NotPinned(AssertionError):
    pass


def lmdeploy_pin(pyproject: dict) -> str:
    """X.Y.Z of the one ``lmdeploy==X.Y.Z`` in [project] dependencies; NotPinned says what is there instead."""
    found = []
    for dep in pyproject["project"].get("dependencies", []):
        try:
            req = Requirement(dep)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == "lmdeploy":
            found.append((dep, req))
    if len(found) != 1:
        raise NotPinned(f"pyproject.toml's [project] dependencies have {len(found)} lmdeploy requirements "
                        f"({[d for d, _ in found]}); the image needs exactly one, 'lmdeploy==X.Y.Z'")
    dep, req = found[0]
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        raise NotPinned(f"pyproject.toml has '{dep}', not an exact pin 'lmdeploy==X.Y.Z': the base image's tag "
                        f"names one lmdeploy release, so pyproject must pin that release")
    return specs[0].version


# ---- the checks -----------------------------------------------------------------------------------------------

def base_problems(dockerfile: str, pyproject: dict) -> list[str]:
    """(a) FROM openmmlab/lmdeploy:v<the pinned version>-cu<CUDA>."""
    try:
        pin = lmdeploy_pin(pyproject)
    except NotPinned as exc:
        return [str(exc)]
    image, tag = base_image(dockerfile)
    if "$" in image + tag:
        return [f"FROM {image}:{tag} is built from a build arg; write the tag out so it can be checked"]
    problems = []
    if image not in (BASE_IMAGE, f"docker.io/{BASE_IMAGE}"):
        problems.append(f"FROM image is {image!r}, not lmdeploy's official {BASE_IMAGE}")
    release = RELEASE_TAG.fullmatch(tag)
    if release is None:
        problems.append(f"FROM tag {tag!r} names no lmdeploy release (expected v{pin}-cu12.8 or the like)")
    elif release.group("version") != pin:
        problems.append(f"FROM tag {tag!r} is lmdeploy {release.group('version')}, "
                        f"but pyproject.toml pins lmdeploy=={pin}")
    return problems


def copy_problems(dockerfile: str, root: Path, dockerignore: str) -> list[str]:
    """(b) every COPY / ADD source is in the repository and in the build context."""
    problems = []
    sources = copy_sources(dockerfile)
    if not sources:
        problems.append("the Dockerfile COPYs nothing from the build context (launch would not be in it)")
    for line, source in sources:
        rel = posixpath.normpath(source)
        if re.match(r"[a-z]+://", source) or rel.startswith(("/", "../")) or rel == "..":
            problems.append(f"line {line}: {source!r} is not a path inside the build context")
            continue
        matches = [p for p in root.glob(rel) if p.exists()] if any(c in rel for c in "*?[") else (
            [root / rel] if (root / rel).exists() else [])
        if not matches:
            problems.append(f"line {line}: COPY source {source!r} does not exist in the repository")
        for match in matches:
            if ignored(dockerignore, match.relative_to(root).as_posix()):
                problems.append(f"line {line}: COPY source {source!r} is left out of the context by .dockerignore")
    return problems


# What the build context must never carry: a virtual environment, git's history, the tests, caches.
MUST_IGNORE = [".venv", ".venv/bin/python", ".git", ".git/HEAD", "tests/conftest.py", ".pytest_cache",
               ".test-cache", "launcher/__pycache__/errors.cpython-312.pyc", "bench-results"]


def dockerignore_problems(dockerignore: str) -> list[str]:
    """(c) .venv, .git, tests and caches stay out of the build context."""
    return [f".dockerignore lets {path!r} into the build context" for path in MUST_IGNORE
            if not ignored(dockerignore, path)]


def entrypoint_problems(dockerfile: str, pyproject: dict) -> list[str]:
    """(d) ENTRYPOINT ["<launch's console script>"]: exec form, so launch is PID 1 and gets SIGTERM."""
    scripts = sorted(pyproject["project"].get("scripts", {}))
    ins = _last(dockerfile, "ENTRYPOINT")
    if ins is None:
        return [f"the Dockerfile has no ENTRYPOINT (expected [{scripts[0]!r}] from [project.scripts])"
                if scripts else "the Dockerfile has no ENTRYPOINT"]
    command = _exec_form(ins.args)
    if command is None:
        return [(f"line {ins.line}: ENTRYPOINT {ins.args} is not in exec form (a JSON list): in shell form "
                 f"/bin/sh is PID 1 and launch never gets docker stop's SIGTERM")]
    if not command or command[0] not in scripts:
        return [(f"line {ins.line}: ENTRYPOINT runs {command[:1]}, not launch's console script "
                 f"({' or '.join(scripts) or 'none in [project.scripts]'})")]
    return []


def label_problems(dockerfile: str, pyproject: dict) -> list[str]:
    """(e) the OCI labels: version is pyproject's, source is set (from a build arg)."""
    found = labels(dockerfile)
    problems = []
    version = pyproject["project"]["version"]
    if found.get("org.opencontainers.image.version") != version:
        problems.append(f"label org.opencontainers.image.version is "
                        f"{found.get('org.opencontainers.image.version')!r}, pyproject's version is {version!r}")
    if "org.opencontainers.image.source" not in found:
        problems.append("no org.opencontainers.image.source label")
    return problems


# ---- the project's own files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def dockerignore() -> str:
    return DOCKERIGNORE.read_text(encoding="utf-8")


def test_base_image_is_lmdeploys_at_the_pinned_release(dockerfile, pyproject):
    assert base_problems(dockerfile, pyproject) == []


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile, dockerignore):
    assert copy_problems(dockerfile, REPO, dockerignore) == []
    assert {source for _, source in copy_sources(dockerfile)} == {
        "pyproject.toml", "README.md", "launcher/", "configs/"}


def test_dockerignore_keeps_venv_git_tests_and_caches_out(dockerignore):
    assert dockerignore_problems(dockerignore) == []


def test_entrypoint_is_launchs_console_script(dockerfile, pyproject):
    assert entrypoint_problems(dockerfile, pyproject) == []


def test_labels_name_the_version(dockerfile, pyproject):
    assert label_problems(dockerfile, pyproject) == []


def test_cache_folders_and_port(dockerfile):
    env = " ".join(ins.args for ins in instructions(dockerfile) if ins.keyword == "ENV")
    assert "HF_HOME=/cache/huggingface" in env.split()
    assert "LAUNCH_CACHE_DIR=/cache/launch" in env.split()
    assert [ins.args for ins in instructions(dockerfile) if ins.keyword == "EXPOSE"] == ["23333"]


def test_router_is_an_empty_build_arg_by_default(dockerfile):
    assert [ins.args for ins in instructions(dockerfile) if ins.keyword == "ARG" and ins.args.startswith("ROUTER")] \
        == ["ROUTER="]


# ---- each check fails on a broken text ----------------------------------------------------------------------

PINNED = {"project": {"name": "launch", "version": "0.1.0", "scripts": {"launch": "launcher.cli:main"},
                      "dependencies": ["lmdeploy==0.18.0", "pyyaml>=6"]}}
GOOD = """\
# a comment
FROM openmmlab/lmdeploy:v0.18.0-cu12.8
WORKDIR /opt/launch
COPY pyproject.toml README.md ./
COPY launcher/ launcher/
COPY --from=openmmlab/lmdeploy:v0.17.0-cu12.8 /opt/py3/bin/lmdeploy /tmp/
RUN python -m pip install --no-deps . \\
 && launch presets > /dev/null
LABEL org.opencontainers.image.version="0.1.0" \\
      org.opencontainers.image.source="${SOURCE_URL}"
ENTRYPOINT ["launch"]
"""


def _with(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def test_the_good_texts_pass():
    assert base_problems(GOOD, PINNED) == []
    assert copy_problems(GOOD, REPO, "*\n!pyproject.toml\n!README.md\n!launcher\n") == []
    assert entrypoint_problems(GOOD, PINNED) == []
    assert label_problems(GOOD, PINNED) == []


@pytest.mark.parametrize("from_line, expected", [
    ("FROM openmmlab/lmdeploy:v0.17.0-cu12.8", "is lmdeploy 0.17.0, but pyproject.toml pins lmdeploy==0.18.0"),
    ("FROM openmmlab/lmdeploy:latest-cu12.8", "names no lmdeploy release"),
    ("FROM openmmlab/lmdeploy", "names no lmdeploy release"),
    ("FROM openmmlab/lmdeploy:v0.18.0", "names no lmdeploy release"),
    ("FROM vllm/vllm-openai:v0.18.0-cu12.8", "not lmdeploy's official openmmlab/lmdeploy"),
    ("FROM openmmlab/lmdeploy:v${LMDEPLOY}-cu12.8", "build arg"),
])
def test_a_wrong_base_is_named(from_line, expected):
    problems = base_problems(_with(GOOD, "FROM openmmlab/lmdeploy:v0.18.0-cu12.8", from_line), PINNED)
    assert len(problems) == 1 and expected in problems[0], problems


def test_only_the_final_stage_counts():
    two_stages = "FROM openmmlab/lmdeploy:v0.18.0-cu12.8 AS base\n" + _with(
        GOOD, "FROM openmmlab/lmdeploy:v0.18.0-cu12.8", "FROM --platform=linux/amd64 python:3.12 AS final")
    assert base_image(two_stages) == ("python", "3.12")
    assert "not lmdeploy's official" in base_problems(two_stages, PINNED)[0]


@pytest.mark.parametrize("dep, expected", [
    ("lmdeploy>=0.18", "'lmdeploy>=0.18', not an exact pin 'lmdeploy==X.Y.Z'"),
    ("lmdeploy==0.18.*", "'lmdeploy==0.18.*', not an exact pin"),
    ("lmdeploy>=0.18,==0.18.0", "not an exact pin"),
    ("lmdeploy", "'lmdeploy', not an exact pin"),
])
def test_a_range_instead_of_a_pin_is_named(dep, expected):
    pyproject = {"project": {**PINNED["project"], "dependencies": [dep, "pyyaml>=6"]}}
    with pytest.raises(NotPinned, match=re.escape(expected)):
        lmdeploy_pin(pyproject)
    assert expected in base_problems(GOOD, pyproject)[0]


def test_no_lmdeploy_requirement_is_named():
    pyproject = {"project": {**PINNED["project"], "dependencies": ["pyyaml>=6"]}}
    assert "0 lmdeploy requirements" in base_problems(GOOD, pyproject)[0]
    assert lmdeploy_pin({"project": {"dependencies": ["LMDeploy == 0.18.0"]}}) == "0.18.0"


@pytest.mark.parametrize("copy_line, expected", [
    ("COPY launcher/ scripts/no-such-file.sh ./", "'scripts/no-such-file.sh' does not exist"),
    ("COPY launcher/ tests/ ./", "'tests/' is left out of the context by .dockerignore"),
    ("COPY launcher/ ../outside ./", "is not a path inside the build context"),
    ("ADD https://example.com/x.tar.gz /x", "is not a path inside the build context"),
    ("COPY [\"launcher/\", \"bench/nothing-*.py\", \"./\"]", "'bench/nothing-*.py' does not exist"),
])
def test_a_missing_or_ignored_copy_source_is_named(copy_line, expected):
    broken = _with(GOOD, "COPY launcher/ launcher/", copy_line)
    ignore = "*\n!pyproject.toml\n!README.md\n!launcher\n"
    problems = copy_problems(broken, REPO, ignore)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_source_the_allow_list_forgot_is_named():
    problems = copy_problems(GOOD, REPO, "*\n!pyproject.toml\n!launcher\n")
    assert problems == ["line 4: COPY source 'README.md' is left out of the context by .dockerignore"]


@pytest.mark.parametrize("ignore, let_in", [
    ("", MUST_IGNORE),
    ("**/__pycache__\n.pytest_cache\n.test-cache\nbench-results\ntests\n", [".venv", ".venv/bin/python", ".git",
                                                                             ".git/HEAD"]),
    ("*\n!.venv/\n", [".venv", ".venv/bin/python"]),
    ("*\n!**/*.pyc\n", ["launcher/__pycache__/errors.cpython-312.pyc"]),
    ("# .venv\n# .git\n*.txt\n", MUST_IGNORE),
])
def test_a_dockerignore_that_lets_things_in_is_named(ignore, let_in):
    assert dockerignore_problems(ignore) == [f".dockerignore lets {p!r} into the build context" for p in let_in]


@pytest.mark.parametrize("ignore, path, expected", [
    ("*", "launcher/cli/__init__.py", True),  # a folder left out leaves out what is inside
    ("*\n!launcher/", "launcher/cli/__init__.py", False),
    ("*\n!launcher/\n**/__pycache__", "launcher/cli/__pycache__/x.pyc", True),
    ("**/*.py[cod]", "a/b/c.pyo", True),
    ("**/*.py[cod]", "a/b/c.py", False),
    ("/.venv", ".venv/lib/site.py", True),
    ("*.md", "docs/ARCHITECTURE.md", False),  # * stays within one folder
    ("*/*.md", "docs/ARCHITECTURE.md", True),
    ("te?ts", "tests/x.py", True),
])
def test_dockerignore_matching_follows_docker(ignore, path, expected):
    assert ignored(ignore, path) is expected


@pytest.mark.parametrize("entrypoint, expected", [
    ('ENTRYPOINT ["lmdeploy"]', "not launch's console script (launch)"),
    ("ENTRYPOINT launch", "not in exec form"),
    ('ENTRYPOINT ["launch"', "not in exec form"),
    ("ENTRYPOINT []", "not launch's console script"),
    ("", "has no ENTRYPOINT (expected ['launch']"),
])
def test_a_wrong_entrypoint_is_named(entrypoint, expected):
    problems = entrypoint_problems(_with(GOOD, 'ENTRYPOINT ["launch"]', entrypoint), PINNED)
    assert len(problems) == 1 and expected in problems[0], problems


def test_an_entrypoint_named_after_another_script_is_named():
    renamed = {"project": {**PINNED["project"], "scripts": {"launch-cli": "launcher.cli:main"}}}
    assert "not launch's console script (launch-cli)" in entrypoint_problems(GOOD, renamed)[0]


def test_a_stale_version_label_is_named():
    bumped = {"project": {**PINNED["project"], "version": "0.2.0"}}
    assert label_problems(GOOD, bumped) == [
        "label org.opencontainers.image.version is '0.1.0', pyproject's version is '0.2.0'"]
    no_source = _with(GOOD, ' \\\n      org.opencontainers.image.source="${SOURCE_URL}"', "")
    assert label_problems(no_source, PINNED) == ["no org.opencontainers.image.source label"]


def test_comments_continuations_and_heredocs_are_read_as_docker_does():
    text = ("FROM a:b\n"
            "RUN echo one \\\n"
            "# a comment inside the continuation\n"
            "    two\n"
            "RUN python - <<'PY'\n"
            "from os import sep\n"
            "PY\n"
            "ENTRYPOINT [\"launch\"]\n")
    assert [(i.keyword, i.args, i.line) for i in instructions(text)] == [
        ("FROM", "a:b", 1), ("RUN", "echo one two", 2), ("RUN", "python - <<'PY'", 5),
        ("ENTRYPOINT", '["launch"]', 8)]
    assert base_image("FROM registry:5000/openmmlab/lmdeploy") == ("registry:5000/openmmlab/lmdeploy", "")
    assert base_image("FROM openmmlab/lmdeploy:v0.18.0-cu12.8@sha256:abc") == (BASE_IMAGE, "v0.18.0-cu12.8")
