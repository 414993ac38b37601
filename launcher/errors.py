"""Typed errors carrying their facts, and the one table that turns them into user messages.

Library code raises these and never prints. ``launcher.cli.main`` catches ``LaunchError``, prints
``user_message(err)`` as one line on stderr and exits non-zero. ``LAUNCH_DEBUG=1`` shows the
traceback as well.

To add an error: a subclass of ``LaunchError`` with its facts as annotated fields and its
``message`` beside them (a format string over those fields, or a method). The message says what is
wrong and what to do next. (``MESSAGES`` is the older table, being emptied into the classes.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Union

DEBUG_ENV = "LAUNCH_DEBUG"


class LaunchError(Exception):
    """A failure the user can fix. ``str(err)`` is the one-line message.

    A subclass declares its facts as annotated class attributes (a value is the default), like a
    dataclass; they become the constructor's parameters, in order, after the inherited ones. (Not
    ``@dataclass``: generating ~60 classes' methods at import costs start-up time of every command.)
    """

    exit_code = 1
    _fields: tuple[str, ...] = ()
    # The one line the user sees: a format string over the facts (``{name_list}`` joins a tuple), or
    # a method ``def message(self) -> str``. Declared without an annotation (annotations are facts).
    message = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [name for name in inspect.get_annotations(cls) if not name.startswith("_") and name != "exit_code"]
        cls._fields = tuple(dict.fromkeys([*cls._fields, *own]))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} facts, got {len(args)}")
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated fact {name!r}")
            values[name] = value
        for name in names:
            if name not in values:
                if not hasattr(type(self), name):
                    raise TypeError(f"{type(self).__name__} needs the fact {name!r}")
                values[name] = getattr(type(self), name)
            setattr(self, name, values[name])
        super().__init__(*(values[name] for name in names))

    def facts(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.facts() == self.facts()  # type: ignore[attr-defined]

    __hash__ = Exception.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.facts().items())})"

    def __str__(self) -> str:
        return user_message(self)


# --- input -----------------------------------------------------------------------------------


class BadFactor(LaunchError):
    value: str
    exit_code = 2


class BadOption(LaunchError):
    """A flag value that is not acceptable; ``reason`` says why and what to give instead."""

    option: str
    value: str
    reason: str
    exit_code = 2


class MissingFactor(LaunchError):
    model: str
    exit_code = 2


class UnknownRopeType(LaunchError):
    value: str
    known: tuple[str, ...]
    exit_code = 2


# --- RoPE rules -------------------------------------------------------------------------------


class UnsupportedRopeType(LaunchError):
    """A type launch can write, but the chosen engine does not implement, or vice versa."""

    rope_type: str
    engine: str
    supported: tuple[str, ...]


class ExistingScalingUnsupported(LaunchError):
    rope_type: str


class ReplacesScaling(LaunchError):
    existing: str
    existing_factor: float | None
    requested: str


class ShrinksContext(LaunchError):
    served: int
    requested: int
    rope_type: str
    factor: float


class SessionBeyondScaling(LaunchError):
    session_len: int
    covered: int
    rope_type: str


class BadConfig(LaunchError):
    """config.json (or a preset's stand-in for it) lacks a fact the rules need."""

    source: str
    problem: str


# --- presets ----------------------------------------------------------------------------------


class UnknownPreset(LaunchError):
    name: str
    suggestions: tuple[str, ...] = ()


class InvalidPreset(LaunchError):
    path: str
    field_name: str
    problem: str


class DuplicatePreset(LaunchError):
    name: str
    first: str
    second: str


# --- model directories and overlays -----------------------------------------------------------


class NotAModelDir(LaunchError):
    path: str
    problem: str
    exit_code = 2


class MalformedConfig(LaunchError):
    path: str
    problem: str


class OverlayNotWritable(LaunchError):
    path: str
    problem: str


class OverlayConflict(LaunchError):
    path: str
    problem: str


class StaleOverlay(LaunchError):
    path: str
    missing: tuple[str, ...] = ()


def _suggest(err: UnknownPreset) -> str:
    hint = f" Did you mean: {', '.join(err.suggestions)}?" if err.suggestions else ""
    return (
        f"no preset or model directory named {err.name!r}.{hint} "
        "`launch presets` lists the presets; a path to a local model directory also works."
    )


def _replaces(err: ReplacesScaling) -> str:
    factor = f" x{err.existing_factor:g}" if err.existing_factor else ""
    return (
        f"the config already has {err.existing}{factor} RoPE scaling; writing {err.requested} "
        f"would replace it. Use --type {err.existing} to extend it, or add --force to replace it "
        "on purpose."
    )


Message = Union[str, Callable[[LaunchError], str]]  # noqa: UP007 - a runtime alias on Python 3.10

MESSAGES: dict[type[LaunchError], Message] = {
    BadFactor: "factor must be a finite number greater than 1, got {value!r}. Example: --factor 2",
    BadOption: "{option} {value!r}: {reason}",
    MissingFactor: (
        "{model} has no default factor (no preset, no RoPE scaling in its config). "
        "Give one, e.g. --factor 2"
    ),
    UnknownRopeType: "unknown RoPE type {value!r}. Choose one of: {known_list}",
    UnsupportedRopeType: (
        "RoPE type {rope_type!r} is not implemented by the {engine} engine "
        "(it has: {supported_list}). Choose another --type or --backend."
    ),
    ExistingScalingUnsupported: (
        "the config already uses {rope_type!r} RoPE scaling, which launch cannot extend. "
        "Serve it as it is with lmdeploy, or pick a checkpoint without it."
    ),
    ReplacesScaling: _replaces,
    ShrinksContext: (
        "{rope_type} x{factor:g} serves {requested} tokens, less than the {served} the config "
        "already serves. Use a larger --factor, or add --force to shrink it on purpose."
    ),
    SessionBeyondScaling: (
        "--session-len {session_len} is past the {covered} tokens that {rope_type} scaling covers. "
        "Raise --factor, or add --force to serve it anyway."
    ),
    BadConfig: "{source}: {problem}",
    UnknownPreset: _suggest,
    InvalidPreset: "invalid preset {path}: field {field_name!r}: {problem}",
    DuplicatePreset: (
        "preset {name!r} is defined twice: {first} and {second}. Rename or remove one."
    ),
    NotAModelDir: "{path}: {problem}",
    MalformedConfig: "{path} is not valid config JSON: {problem}. Re-download the checkpoint.",
    OverlayNotWritable: (
        "cannot write the overlay at {path}: {problem}. "
        "Pick another place with --out or LAUNCH_CACHE_DIR."
    ),
    OverlayConflict: "{path}: {problem}",
    StaleOverlay: (
        "overlay {path} points at files that are gone ({missing_list}); the source was moved or "
        "its cache pruned. Fetch the model again, then re-run."
    ),
}


def _format(template: str, err: LaunchError) -> str:
    facts = err.facts()
    for key, value in list(facts.items()):
        if isinstance(value, (tuple, list)):
            facts[f"{key}_list"] = ", ".join(str(v) for v in value)
    return template.format(**facts)


def user_message(err: LaunchError) -> str:
    """The one line a user sees for ``err``: its class's ``message`` (a format string over its facts,
    ``{name_list}`` joining a tuple, or a method), else the old table below."""
    own = getattr(type(err), "message", None)
    if callable(own):
        return own(err)
    if isinstance(own, str):
        return _format(own, err)
    for klass in type(err).__mro__:
        template = MESSAGES.get(klass)  # type: ignore[arg-type]
        if template is None:
            continue
        if callable(template):
            return template(err)
        return _format(template, err)
    return type(err).__name__


# --- probe and ppl (launcher/probe, launcher/ppl) ----------------------------------------------
# Transport failures are launcher.http's Unreachable / DeadlineExceeded; URLs here are redacted.


class ProbeUnauthorized(LaunchError):
    url: str
    key_given: bool

    def message(self) -> str:
        if self.key_given:
            return f"{self.url} rejected the API key (HTTP 401). Check --api-key or LAUNCH_API_KEY."
        return f"{self.url} needs an API key (HTTP 401): pass --api-key or set LAUNCH_API_KEY."


class ProbeHTTPError(LaunchError):
    """The server answered with an HTTP error; ``detail`` is its own message."""

    url: str
    status: int
    detail: str
    message = "{url} answered HTTP {status}: {detail}"


class ProbeErrorBody(LaunchError):
    """HTTP 200 whose body is an error, not an answer (lmdeploy's proxy: ``{"error_code": 10402, "text": ...}``
    while a dead node is still registered)."""

    url: str
    code: str
    detail: str
    message = "{url} answered with an error instead of a result (error_code {code}): {detail}"


class ProbeBadReply(LaunchError):
    """The server answered 200 with something that is not the expected JSON shape."""

    url: str
    problem: str
    message = "{url} did not answer like an lmdeploy / OpenAI-compatible server: {problem}"


class ProbeNoModel(LaunchError):
    url: str
    message = "{url} lists no model in /v1/models. Pass --model NAME."


class ProbeUnknownModel(LaunchError):
    model: str
    available: tuple[str, ...]
    exit_code = 2
    message = "the server does not serve model {model!r}; it serves: {available_list}. Fix --model."


class ProbeLengthTooShort(LaunchError):
    length: int
    minimum: int
    exit_code = 2
    message = ("length {length} is too short: the question and passkey alone take {minimum} tokens. "
               "Use lengths of at least {minimum}.")


class ProbeTokenizerFailed(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "cannot load a tokenizer from {path}: {problem}. Fix --tokenizer or leave it out."


class ProbeBelowThreshold(LaunchError):
    accuracy: float
    threshold: float
    results: str
    message = "overall passkey accuracy {accuracy:.2f} is below --min-accuracy {threshold:g} (details in {results})."


class PplNoEndpoint(LaunchError):
    """The server has no ``POST /get_ppl`` (only lmdeploy's api_server scores a text)."""

    url: str
    status: int
    message = ("{url} has no POST /get_ppl (HTTP {status}): launch ppl needs lmdeploy's api_server "
               "(launch serve), which scores a text there.")


class PplNoTokenizer(LaunchError):
    url: str
    exit_code = 2
    message = ("{url} has no POST /v1/encode to cut windows in the model's tokens: pass --tokenizer DIR "
               "(the model's local directory).")


class PplTextTooShort(LaunchError):
    length: int
    available: int
    source: str
    exit_code = 2
    message = ("a window of {length} tokens is longer than the text: {source} has {available} tokens. "
               "Give a longer --text (or several) or shorter --lengths.")


class PplBadText(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "--text {path}: {problem}"


class CompareBadRun(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "--compare {path}: {problem}"


# --- serve: API keys, port check, supervised server (launcher/apikeys.py, launcher/supervise.py) ---
# These messages never contain an API key itself, only where it came from. The server errors end
# with the last lines of the server's log, one per line after the first (the first line alone says
# what happened and what to do).


class BadApiKey(LaunchError):
    source: str  # where the key came from: "--api-key #2", "LAUNCH_API_KEYS entry 3", "keys.txt line 4"
    problem: str
    exit_code = 2


class ApiKeyFileError(LaunchError):
    path: str
    problem: str
    exit_code = 2


class PortBusy(LaunchError):
    host: str
    port: int
    problem: str


class ServerNotStarted(LaunchError):
    command: str
    problem: str


class ServerLogNotWritable(LaunchError):
    path: str
    problem: str


class ServerStartFailed(LaunchError):
    """The server process ended before ``/health`` answered 200."""

    returncode: int
    log_path: str
    tail: tuple[str, ...] = ()


class ServerStartTimeout(LaunchError):
    timeout_s: float
    flag: str
    log_path: str
    tail: tuple[str, ...] = ()


class ServerDied(LaunchError):
    """The server process ended on its own after it was ready."""

    returncode: int
    log_path: str
    tail: tuple[str, ...] = ()


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``: a negative code is a signal."""
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


def _with_tail(first_line: str, tail: tuple[str, ...]) -> str:
    if not tail:
        return first_line + " The log is empty."
    return first_line + " Last log lines:\n" + "\n".join(f"  | {line}" for line in tail)


MESSAGES.update({
    BadApiKey: (
        "API key {source} {problem}. A key is one word of printable ASCII without spaces, "
        "e.g. from `openssl rand -hex 24`."
    ),
    ApiKeyFileError: "cannot read API keys from {path}: {problem}. Give a file with one key per line.",
    PortBusy: (
        "port {port} on {host} is already in use ({problem}). Stop what listens there, or pick "
        "another port with --port."
    ),
    ServerNotStarted: "cannot start the server ({command}): {problem}",
    ServerLogNotWritable: (
        "cannot write the server log {path}: {problem}. Free some space or fix the permissions there."
    ),
    ServerStartFailed: lambda e: _with_tail(
        f"the server {describe_exit(e.returncode)} while starting; full log: {e.log_path}.", e.tail),
    ServerStartTimeout: lambda e: _with_tail(
        f"the server did not answer /health within {e.timeout_s:g} s, so launch stopped it. If the "
        f"model needs longer to load, raise {e.flag}; full log: {e.log_path}.", e.tail),
    ServerDied: lambda e: _with_tail(
        f"the server {describe_exit(e.returncode)} after it was ready; full log: {e.log_path}.", e.tail),
})


# --- hub: checkpoint download (launcher/hub.py, launch fetch) ----------------------------------
# One line each, naming the repo and what to do. Sizes are bytes (shown human-readable).


class BadRepoId(LaunchError):
    value: str
    exit_code = 2


class RepoNotFound(LaunchError):
    repo_id: str
    endpoint: str


class RevisionNotFound(LaunchError):
    repo_id: str
    revision: str
    endpoint: str


class GatedRepo(LaunchError):
    """The repo needs its licence accepted on the model page, and a token of that account."""

    repo_id: str
    url: str
    has_token: bool


class HubFileMissing(LaunchError):
    repo_id: str
    revision: str
    filename: str


class NoWeights(LaunchError):
    repo_id: str
    revision: str
    found: tuple[str, ...] = ()


class HubUnreachable(LaunchError):
    """The hub cannot be used and the cache does not hold the revision at all."""

    repo_id: str
    revision: str
    endpoint: str
    reason: str
    cache_dir: str


class NotCached(LaunchError):
    """The cache does not hold the revision at all, and ``reason`` says why the hub is not asked."""

    repo_id: str
    revision: str
    cache_dir: str
    reason: str = "HF_HUB_OFFLINE is set"


class IncompleteCache(LaunchError):
    """The cache holds part of the revision and the hub cannot be used to complete it."""

    repo_id: str
    revision: str
    path: str
    missing: tuple[str, ...]
    reason: str


class HubTimeout(LaunchError):
    endpoint: str
    seconds: float
    doing: str


class HubError(LaunchError):
    """The hub answered with an error launch has no better words for; ``detail`` is what it said."""

    repo_id: str
    endpoint: str
    detail: str


class DiskFull(LaunchError):
    cache_dir: str
    needed: int | None = None
    free: int | None = None


class CacheNotWritable(LaunchError):
    cache_dir: str
    problem: str


def human_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as huggingface_hub's progress bars show them)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _gated(e: GatedRepo) -> str:
    if e.has_token:
        return (
            f"{e.repo_id} is gated and your token has no access to it: accept the licence on the model "
            f"page {e.url} with the account of that token, or set HF_TOKEN to a token of an account that has."
        )
    return (
        f"{e.repo_id} is gated: accept the licence on the model page {e.url}, then set HF_TOKEN to a "
        "read token of that account (https://huggingface.co/settings/tokens)."
    )


def _incomplete(e: IncompleteCache) -> str:
    sample = ", ".join(e.missing[:3]) + (f" and {len(e.missing) - 3} more" if len(e.missing) > 3 else "")
    return (
        f"the cached copy of {e.repo_id}@{e.revision} at {e.path} lacks {len(e.missing)} file(s) "
        f"({sample}) and {e.reason}. Run `launch fetch {e.repo_id}` where the hub can be reached to "
        "complete it."
    )


def _disk_full(e: DiskFull) -> str:
    need = f": the download needs {human_bytes(e.needed)} more" if e.needed else ""
    free = f", {human_bytes(e.free)} is free" if e.free is not None else ""
    return (
        f"not enough disk space for the Hugging Face cache at {e.cache_dir}{need}{free}. Free some space, "
        "or move the cache with HF_HOME (or HF_HUB_CACHE) to a disk with room."
    )


def _no_weights(e: NoWeights) -> str:
    found = f" (it has: {', '.join(e.found[:4])})" if e.found else ""
    return (
        f"{e.repo_id}@{e.revision} has no safetensors or PyTorch .bin weights at its top level{found}; "
        "launch serves transformers checkpoints. Pick the repo of the original (non-GGUF) model."
    )


MESSAGES.update({
    BadRepoId: (
        "{value!r} is not a Hugging Face repo id. Give ORG/NAME (e.g. internlm/internlm2_5-7b-chat) "
        "or a preset name (`launch presets`)."
    ),
    RepoNotFound: (
        "repository {repo_id} was not found on {endpoint}. Check the name; if it is private, set "
        "HF_TOKEN to a token that can read it."
    ),
    RevisionNotFound: (
        "{repo_id} has no revision {revision!r} (branch, tag or commit) on {endpoint}. Check --revision "
        "or the preset's revision."
    ),
    GatedRepo: _gated,
    HubFileMissing: (
        "{repo_id}@{revision} has no {filename}; it is not a transformers checkpoint launch can serve."
    ),
    NoWeights: _no_weights,
    HubUnreachable: (
        "cannot reach the hub at {endpoint} ({reason}) and {repo_id}@{revision} is not in the cache at "
        "{cache_dir}. Check the network, proxy or HF_ENDPOINT, then run `launch fetch {repo_id}` again."
    ),
    NotCached: (
        "{repo_id}@{revision} is not in the Hugging Face cache at {cache_dir} ({reason}). Run "
        "`launch fetch {repo_id}` with the hub reachable and HF_HUB_OFFLINE unset to download it."
    ),
    IncompleteCache: _incomplete,
    HubTimeout: (
        "the hub at {endpoint} sent nothing for {seconds:g} s while {doing}, so launch gave up. Check the "
        "network or HF_ENDPOINT, or allow longer with --timeout (or LAUNCH_HUB_TIMEOUT)."
    ),
    HubError: "the hub at {endpoint} failed for {repo_id}: {detail}. Try again later.",
    DiskFull: _disk_full,
    CacheNotWritable: (
        "cannot write the Hugging Face cache at {cache_dir}: {problem}. Set HF_HOME (or HF_HUB_CACHE) to "
        "a writable directory."
    ),
})


# --- serve: engine and memory checks before loading (launcher/serve.py) -------------------------


class EngineUnavailable(LaunchError):
    """The chosen engine cannot run here or cannot take this model; no silent fallback."""

    backend: str
    reason: str


class RunDirNotWritable(LaunchError):
    path: str
    problem: str


class NoSessionFits(LaunchError):
    session_len: int
    per_session_gib: float
    budget_gib: float
    advice: tuple[str, ...]


MESSAGES.update({
    EngineUnavailable: (
        "the {backend} engine cannot serve this: {reason}. launch never falls back silently: "
        "add --backend pytorch to use lmdeploy's PyTorch engine instead."
    ),
    RunDirNotWritable: (
        "cannot write the server's run files at {path}: {problem}. Set LAUNCH_CACHE_DIR to a writable place."
    ),
    NoSessionFits: (
        "not even one {session_len}-token session fits: it needs {per_session_gib:.2f} GiB of KV cache per "
        "GPU, the budget is {budget_gib:.2f} GiB. Would fit: {advice_list}"
    ),
})
