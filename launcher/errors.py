"""Typed errors carrying their facts, and the one table that turns them into user messages.

Library code raises these and never prints. ``launcher.cli.main`` catches ``LaunchError``, prints
``user_message(err)`` as one line on stderr and exits non-zero. ``LAUNCH_DEBUG=1`` shows the
traceback as well.

To add an error: a subclass of ``LaunchError`` with its facts as annotated fields and its
``message`` beside them (a format string over those fields, or a method). The message says what is
wrong and what to do next.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

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


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a path, an escape sequence) and lone
    surrogates (a file name that is not UTF-8) written as escapes, so that it stays one line,
    cannot drive the terminal and can be written to any stream."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class _Fact(str):
    """A text fact as a message shows it: printable (``printable``); ``{fact!r}`` is ``repr`` of
    the text as given (which escapes the same characters)."""

    given: str

    def __repr__(self) -> str:
        return repr(self.given)


def _shown_fact(value: Any) -> Any:
    """A fact as every message shows it: text (a path included) printable, in tuples and lists too."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, _Fact) or not isinstance(value, str):
        return value if not isinstance(value, (tuple, list)) else type(value)(_shown_fact(v) for v in value)
    fact = _Fact(printable(value))
    fact.given = value
    return fact


class _Shown:
    """``err`` as its ``message`` method reads it: each fact through ``_shown_fact``."""

    def __init__(self, err: LaunchError) -> None:
        self._err = err

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._err, name)
        return _shown_fact(value) if name in self._err._fields else value


def _format(template: str, err: LaunchError) -> str:
    facts = {key: _shown_fact(value) for key, value in err.facts().items()}
    for key, value in list(facts.items()):
        if isinstance(value, (tuple, list)):
            facts[f"{key}_list"] = ", ".join(str(v) for v in value)
    return template.format(**facts)


def user_message(err: LaunchError) -> str:
    """What a user sees for ``err``: its class's ``message``, a format string over its facts
    (``{name_list}`` joins a tuple) or a method. Every fact is shown printable, whatever a server,
    a file or a file name put in it: the message's lines are the template's own (one, except a
    server log's tail), and no fact can add a line or drive the terminal."""
    own = type(err).message
    if callable(own):
        return own(_Shown(err))
    if isinstance(own, str):
        return _format(own, err)
    return type(err).__name__


# --- input -----------------------------------------------------------------------------------


class BadFactor(LaunchError):
    value: str
    exit_code = 2
    message = "factor must be a finite number greater than 1, got {value!r}. Example: --factor 2"


class BadOption(LaunchError):
    """A flag value that is not acceptable; ``reason`` says why and what to give instead."""

    option: str
    value: str
    reason: str
    exit_code = 2
    message = "{option} {value!r}: {reason}"


class MissingFactor(LaunchError):
    model: str
    exit_code = 2
    message = (
        "{model} has no default factor (no preset, no RoPE scaling in its config). "
        "Give one, e.g. --factor 2"
    )


class UnknownRopeType(LaunchError):
    value: str
    known: tuple[str, ...]
    exit_code = 2
    message = "unknown RoPE type {value!r}. Choose one of: {known_list}"


# --- RoPE rules -------------------------------------------------------------------------------


class _Printable(LaunchError):
    """Errors whose facts come from file names and file contents. (Every error's facts are shown
    printable now, by ``user_message``; this class only keeps its name for its subclasses.)"""

    def __str__(self) -> str:
        return printable(user_message(self))


class UnsupportedRopeType(_Printable):
    """A type launch can write, but the chosen engine does not implement, or vice versa."""

    rope_type: str
    engine: str
    supported: tuple[str, ...]
    message = (
        "RoPE type {rope_type!r} is not implemented by the {engine} engine "
        "(it has: {supported_list}). Choose another --type or --backend."
    )


class ExistingScalingUnsupported(_Printable):
    rope_type: str
    message = (
        "the config already uses {rope_type!r} RoPE scaling, which launch cannot extend. "
        "Serve it as it is with lmdeploy, or pick a checkpoint without it."
    )


class PerAttentionRope(_Printable):
    """A transformers-5 ``rope_parameters`` keyed per attention type (Gemma 3's shape)."""

    source: str
    key: str
    kinds: tuple[str, ...]
    message = (
        "{source}: {key} holds separate RoPE settings per attention type ({kinds_list}); lmdeploy reads "
        "that shape only in its own model code (a fixed linear scaling), so launch does not patch it. "
        "Serve this checkpoint as it is with lmdeploy."
    )


class ReplacesScaling(_Printable):
    existing: str
    existing_factor: float | None
    requested: str

    def message(self) -> str:
        factor = f" x{self.existing_factor:g}" if self.existing_factor else ""
        return (
            f"the config already has {self.existing}{factor} RoPE scaling; writing {self.requested} "
            f"would replace it. Use --type {self.existing} to extend it, or add --force to replace it "
            "on purpose."
        )


class ShrinksContext(_Printable):
    served: int
    requested: int
    rope_type: str
    factor: float
    message = (
        "{rope_type} x{factor:g} serves {requested} tokens, less than the {served} the config "
        "already serves. Use a larger --factor, or add --force to shrink it on purpose."
    )


class ContextTooLong(_Printable):
    """N x F past what lmdeploy can hold (its session length is a 32-bit int)."""

    source: str
    native: int
    factor: float
    limit: int
    message = (
        "{source}: factor {factor:g} over the native {native} tokens is past lmdeploy's limit of "
        "{limit} tokens per session. Use a smaller --factor."
    )


class SessionBeyondScaling(_Printable):
    session_len: int
    covered: int
    rope_type: str
    message = (
        "--session-len {session_len} is past the {covered} tokens that {rope_type} scaling covers. "
        "Raise --factor, or add --force to serve it anyway."
    )


class BadConfig(_Printable):
    """config.json (or a preset's stand-in for it) lacks a fact the rules need, or has one of the
    wrong type or range; ``problem`` names the field and the value."""

    source: str
    problem: str
    message = "{source}: {problem}. Fix the config, or pick a checkpoint with a valid one."


# --- presets ----------------------------------------------------------------------------------


class UnknownPreset(_Printable):
    name: str
    suggestions: tuple[str, ...] = ()

    def message(self) -> str:
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        return (
            f"no preset or model directory named {self.name!r}.{hint} "
            "`launch presets` lists the presets; a path to a local model directory also works."
        )


class InvalidPreset(_Printable):
    path: str
    field_name: str
    problem: str
    message = "invalid preset {path}: field {field_name!r}: {problem}"


class DuplicatePreset(_Printable):
    name: str
    first: str
    second: str
    message = "preset {name!r} is defined twice: {first} and {second}. Rename or remove one."


class PresetsDirNotADir(_Printable):
    path: str
    message = (
        "LAUNCH_PRESETS_DIR names {path}, which is not a directory. Point it at directories of "
        "preset files (several separated by ':'), or unset it."
    )


# --- model directories and overlays -----------------------------------------------------------


class NotAModelDir(_Printable):
    path: str
    problem: str
    exit_code = 2
    message = "{path}: {problem}"


class MalformedConfig(_Printable):
    path: str
    problem: str
    message = "{path} is not valid config JSON: {problem}. Re-download the checkpoint."


class OverlayNotWritable(_Printable):
    path: str
    problem: str
    message = (
        "cannot write the overlay at {path}: {problem}. "
        "Pick another place with --out or LAUNCH_CACHE_DIR."
    )


class OverlayConflict(_Printable):
    """--out (or an overlay's place) holds something launch cannot prove it wrote."""

    path: str
    problem: str
    message = "{path}: {problem}"


class BadOutPath(_Printable):
    """An --out that cannot name an overlay directory (empty, too long, control characters)."""

    path: str
    problem: str
    exit_code = 2
    message = "--out {path}: {problem}"


class StaleOverlay(_Printable):
    path: str
    missing: tuple[str, ...] = ()
    message = (
        "overlay {path} points at files that are gone ({missing_list}); the source was moved or "
        "its cache pruned. Fetch the model again, then re-run."
    )


# --- probe and ppl (launcher/eval/probe, launcher/eval/ppl) ----------------------------------------------
# Transport failures are launcher.net.http's Unreachable / DeadlineExceeded; URLs here are redacted.


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


# --- serve: API keys, port check, supervised server (launcher/runtime/apikeys.py, address.py, supervise.py) ---
# These messages never contain an API key itself, only where it came from. The server errors end
# with the last lines of the server's log, one per line after the first (the first line alone says
# what happened and what to do).


class BadApiKey(LaunchError):
    source: str  # where the key came from: "--api-key #2", "LAUNCH_API_KEYS entry 3", "keys.txt line 4"
    problem: str
    exit_code = 2
    message = ("API key {source} {problem}. A key is one word of printable ASCII without spaces, "
               "e.g. from `openssl rand -hex 24`.")


class ApiKeyFileError(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "cannot read API keys from {path}: {problem}. Give a file with one key per line."


class PortBusy(LaunchError):
    host: str
    port: int
    problem: str
    message = ("port {port} on {host} is already in use ({problem}). Stop what listens there, or pick "
               "another port with --port.")


class ServerNotStarted(LaunchError):
    command: str
    problem: str
    message = "cannot start the server ({command}): {problem}"


class ServerLogNotWritable(LaunchError):
    path: str
    problem: str
    message = "cannot write the server log {path}: {problem}. Free some space or fix the permissions there."


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


class ServerStartFailed(LaunchError):
    """The server process ended before ``/health`` answered 200."""

    returncode: int
    log_path: str
    tail: tuple[str, ...] = ()

    def message(self) -> str:
        return _with_tail(f"the server {describe_exit(self.returncode)} while starting; full log: "
                          f"{self.log_path}.", self.tail)


class ServerStartTimeout(LaunchError):
    timeout_s: float
    log_path: str
    tail: tuple[str, ...] = ()
    flag: str = "--health-timeout"  # the flag that sets timeout_s

    def message(self) -> str:
        return _with_tail(f"the server did not become ready within {self.timeout_s:g} s, so launch stopped "
                          f"it. If it needs longer to start, raise {self.flag}; full log: "
                          f"{self.log_path}.", self.tail)


class ServerDied(LaunchError):
    """The server process ended on its own after it was ready."""

    returncode: int
    log_path: str
    tail: tuple[str, ...] = ()

    def message(self) -> str:
        return _with_tail(f"the server {describe_exit(self.returncode)} after it was ready; full log: "
                          f"{self.log_path}.", self.tail)


# --- hub: checkpoint download (launcher/model/hub.py, launch fetch) ----------------------------------
# One line each, naming the repo and what to do. Sizes are bytes (shown human-readable).


class BadRepoId(LaunchError):
    value: str
    exit_code = 2
    message = ("{value!r} is not a Hugging Face repo id. Give ORG/NAME (e.g. internlm/internlm2_5-7b-chat) "
               "or a preset name (`launch presets`).")


class RepoNotFound(LaunchError):
    repo_id: str
    endpoint: str
    message = ("repository {repo_id} was not found on {endpoint}. Check the name; if it is private, set "
               "HF_TOKEN to a token that can read it.")


class RevisionNotFound(LaunchError):
    repo_id: str
    revision: str
    endpoint: str
    message = ("{repo_id} has no revision {revision!r} (branch, tag or commit) on {endpoint}. Check --revision "
               "or the preset's revision.")


class GatedRepo(LaunchError):
    """The repo needs its licence accepted on the model page, and a token of that account."""

    repo_id: str
    url: str
    has_token: bool

    def message(self) -> str:
        if self.has_token:
            return (f"{self.repo_id} is gated and your token has no access to it: accept the licence on the "
                    f"model page {self.url} with the account of that token, or set HF_TOKEN to a token of an "
                    "account that has.")
        return (f"{self.repo_id} is gated: accept the licence on the model page {self.url}, then set HF_TOKEN "
                "to a read token of that account (https://huggingface.co/settings/tokens).")


class HubFileMissing(LaunchError):
    repo_id: str
    revision: str
    filename: str
    message = "{repo_id}@{revision} has no {filename}; it is not a transformers checkpoint launch can serve."


class NoWeights(LaunchError):
    repo_id: str
    revision: str
    found: tuple[str, ...] = ()

    def message(self) -> str:
        found = f" (it has: {', '.join(self.found[:4])})" if self.found else ""
        return (f"{self.repo_id}@{self.revision} has no safetensors or PyTorch .bin weights at its top level"
                f"{found}; launch serves transformers checkpoints. Pick the repo of the original (non-GGUF) model.")


class HubUnreachable(LaunchError):
    """The hub cannot be used and the cache does not hold the revision at all."""

    repo_id: str
    revision: str
    endpoint: str
    reason: str
    cache_dir: str
    message = ("cannot reach the hub at {endpoint} ({reason}) and {repo_id}@{revision} is not in the cache at "
               "{cache_dir}. Check the network, proxy or HF_ENDPOINT, then run `launch fetch {repo_id}` again.")


class NotCached(LaunchError):
    """The cache does not hold the revision at all, and ``reason`` says why the hub is not asked."""

    repo_id: str
    revision: str
    cache_dir: str
    reason: str = "HF_HUB_OFFLINE is set"
    message = ("{repo_id}@{revision} is not in the Hugging Face cache at {cache_dir} ({reason}). Run "
               "`launch fetch {repo_id}` with the hub reachable and HF_HUB_OFFLINE unset to download it.")


class IncompleteCache(LaunchError):
    """The cache holds part of the revision and the hub cannot be used to complete it."""

    repo_id: str
    revision: str
    path: str
    missing: tuple[str, ...]
    reason: str

    def message(self) -> str:
        more = f" and {len(self.missing) - 3} more" if len(self.missing) > 3 else ""
        return (f"the cached copy of {self.repo_id}@{self.revision} at {self.path} lacks {len(self.missing)} "
                f"file(s) ({', '.join(self.missing[:3])}{more}) and {self.reason}. Run `launch fetch "
                f"{self.repo_id}` where the hub can be reached to complete it.")


class HubTimeout(LaunchError):
    endpoint: str
    seconds: float
    doing: str
    knob: str = "--timeout (or LAUNCH_HUB_TIMEOUT)"
    message = ("the hub at {endpoint} gave no complete answer in {seconds:g} s while {doing}, so launch gave up. "
               "Check the network or HF_ENDPOINT, or allow longer with {knob}.")


class HubError(LaunchError):
    """The hub answered with an error launch has no better words for; ``detail`` is what it said."""

    repo_id: str
    endpoint: str
    detail: str
    message = "the hub at {endpoint} failed for {repo_id}: {detail}. Try again later."


class DiskFull(LaunchError):
    cache_dir: str
    needed: int | None = None
    free: int | None = None

    def message(self) -> str:
        need = f": the download needs {human_bytes(self.needed)} more" if self.needed else ""
        free = f", {human_bytes(self.free)} is free" if self.free is not None else ""
        return (f"not enough disk space for the Hugging Face cache at {self.cache_dir}{need}{free}. Free some "
                "space, or move the cache with HF_HOME (or HF_HUB_CACHE) to a disk with room.")


class CacheNotWritable(LaunchError):
    cache_dir: str
    problem: str
    message = ("cannot write the Hugging Face cache at {cache_dir}: {problem}. Set HF_HOME (or HF_HUB_CACHE) to "
               "a writable directory.")


class CacheNotADirectory(LaunchError):
    """HF_HOME or HF_HUB_CACHE (or a folder above it) is a file, so no cache can live there."""

    variable: str
    value: str
    file: str
    message = ("{variable} is {value}, but {file} is a file, not a directory, so the Hugging Face cache cannot "
               "be there. Point {variable} at a directory (or unset it).")


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


# --- serve: engine and memory checks before loading (launcher/app/serve.py, launcher/runtime/gpu.py) -------------


class NoGpu(LaunchError):
    """No usable NVIDIA GPU and driver here: neither engine can run, so serve stops before anything."""

    reason: str
    message = ("serving needs an NVIDIA GPU and its driver, and {reason}. What works on this machine: "
               "`launch plan`, `launch serve --dry-run --gpu-memory GiB`, and `launch probe --url` "
               "against a server on a GPU machine.")


class EngineUnavailable(LaunchError):
    """The chosen engine cannot run here or cannot take this model; no silent fallback."""

    backend: str
    reason: str
    message = ("the {backend} engine cannot serve this: {reason}. launch never falls back silently: "
               "add --backend pytorch to use lmdeploy's PyTorch engine instead.")


class RunDirNotWritable(LaunchError):
    path: str
    problem: str
    message = "cannot write the server's run files at {path}: {problem}. Set LAUNCH_CACHE_DIR to a writable place."


class NoSessionFits(LaunchError):
    session_len: int
    per_session_gib: float
    budget_gib: float
    advice: tuple[str, ...]
    message = ("not even one {session_len}-token session fits: it needs {per_session_gib:.2f} GiB of KV cache "
               "per GPU, the budget is {budget_gib:.2f} GiB. Would fit: {advice_list}")


# --- scale-out (launcher/scaleout/nodes*, launcher/plan/layout.py) ---
# lmdeploy's proxy driven through its node API, launch's watchdog, and the replica / multi-node
# layouts. URLs in these messages are shown without credentials (``http.redact``).


class RoutingRefused(LaunchError):
    """A routing strategy of lmdeploy's proxy that launch will not run."""

    value: str
    choices: tuple[str, ...]
    exit_code = 2

    def message(self) -> str:
        if self.value == "min_observed_latency":
            return (
                "--routing min_observed_latency is refused: lmdeploy 0.18's proxy counts a node without "
                "finished requests as infinitely slow, so it sends every request to the first registered "
                f"node. Use one of: {', '.join(self.choices)} (min_expected_latency: the fewest requests in "
                "flight, so faster nodes get more; random: uniform, whatever the load)."
            )
        return f"--routing {self.value!r} is not a routing strategy; choose one of: {', '.join(self.choices)}."


class ProxyUnreachable(LaunchError):
    url: str
    reason: str
    message = (
        "the proxy at {url} does not answer its node API ({reason}). Is `launch proxy start` running "
        "there? Check --proxy."
    )


class ProxyRefused(LaunchError):
    """The proxy's node API answered, but not with success."""

    url: str
    action: str
    detail: str
    message = "the proxy at {url} refused to {action}: {detail}"


class NodeNotHealthy(LaunchError):
    url: str
    detail: str
    message = (
        "the node at {url} is not healthy ({detail}); launch registers a node only once its /health "
        "answers 200. Wait until its server is ready (`launch serve` prints a ready line), then add it again."
    )


class NodeUnauthorized(LaunchError):
    url: str
    with_key: bool
    exit_code = 2

    def message(self) -> str:
        if self.with_key:
            return (f"the node at {self.url} rejected the API key given with --api-key (HTTP 401 on "
                    "/v1/models). Give one of the keys that server was started with.")
        return (f"the node at {self.url} needs an API key (HTTP 401 on /v1/models): give it with "
                "--api-key KEY (or LAUNCH_API_KEY).")


class NodeBadModels(LaunchError):
    url: str
    detail: str
    message = (
        "cannot read the served model names from {url}/v1/models ({detail}); is it an lmdeploy "
        "api_server (`launch serve`)?"
    )


class NodeNotRegistered(LaunchError):
    url: str
    proxy: str
    known: tuple[str, ...]
    exit_code = 2

    def message(self) -> str:
        known = ", ".join(self.known) if self.known else "none"
        return (f"{self.url} is not a node of the proxy at {self.proxy} (its nodes: {known}). "
                "See `launch proxy status --proxy URL`.")


class LayoutNeedsMoreGpus(LaunchError):
    replicas: int
    tp: int
    gpus: int

    def message(self) -> str:
        return (f"--replicas {self.replicas} x --tp {self.tp} needs {self.replicas * self.tp} GPUs, but "
                f"{self.gpus} are visible here (CUDA_VISIBLE_DEVICES counts). Use fewer --replicas or a "
                "smaller --tp.")


class LayoutRefused(LaunchError):
    """lmdeploy's own parallel-config function refuses the layout."""

    tp: int
    nnodes: int
    gpus_per_node: int
    reason: str
    message = (
        "TurboMind cannot run --tp {tp} on {nnodes} node(s) with {gpus_per_node} GPU(s) each: {reason}. "
        "Every node needs tp / nnodes GPUs; use a tp that is nnodes x the GPUs of one node."
    )


class LayoutUncheckable(LaunchError):
    reason: str
    message = "cannot check the layout with lmdeploy's own parallel-config function: {reason}. Run `make install`."


class LayoutHeadsIndivisible(LaunchError):
    what: str
    count: int
    tp: int
    exit_code = 2
    message = (
        "--tp {tp} does not divide the model's {count} {what}: TurboMind splits them evenly over the tp "
        "GPUs. Use a tp that divides {count}."
    )


class ReplicaNotRegistered(LaunchError):
    """``serve --proxy-url`` / ``--replicas``: the ready replica could not join the proxy; serve
    stops it (a replica the proxy does not know gets no traffic)."""

    url: str
    proxy: str
    reason: str
    message = (
        "{url} is healthy but could not be registered with the proxy at {proxy} ({reason}); it was stopped. "
        "Check the proxy (`launch proxy status --proxy {proxy}`) and serve again."
    )
