"""The sweep: for every length x depth x trial, build a prompt of that many tokens, ask, score.

``run_probe`` checks the server first (reachable, key accepted, which model, how to count tokens),
so those failures stop it before any trial. After that a failing trial is recorded and the sweep
goes on (a length past the server's session is a 400 on that cell only). Ctrl-C, a server that
goes away mid-sweep, or ``STUCK_AFTER`` requests in a row past their deadline (an engine that
takes requests and never answers) end the sweep early with the trials so far, so the caller can
still write partial results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from launcher.errors import LaunchError, printable
from launcher.eval.deadlines import StuckWatch, waiting_notice
from launcher.eval.probe.passkey import Filler, build_prompt, is_correct, passkey_for
from launcher.eval.probe.settings import ProbeSettings
from launcher.eval.tokens import ProbeLengthTooShort, TokenCounter, fit_words, pick_counter
from launcher.net.http import Unreachable
from launcher.net.lmdeploy import Client, ServerBadReply, ServerErrorBody, ServerHTTPError, ServerUnauthorized

NO_ANSWER_TEXT = "the reply holds no answer text (choices[0].message.content null, absent or blank)"


class ProbeNoModel(LaunchError):
    url: str
    message = "{url} lists no model in /v1/models. Pass --model NAME."


class ProbeUnknownModel(LaunchError):
    model: str
    available: tuple[str, ...]
    exit_code = 2
    message = "the server does not serve model {model!r}; it serves: {available_list}. Fix --model."


@dataclass
class Trial:
    """One prompt sent and what came back. ``error`` set means it was not answered (counts as a miss):
    an error status or body, a deadline, a reply that cannot be read, or one with no answer text."""

    length: int
    depth: float
    trial: int
    passkey: str
    answer: str | None = None
    correct: bool = False
    latency_s: float | None = None
    prompt_tokens: int | None = None  # as the server counted it (with the chat template) when it says
    measured_tokens: int | None = None  # the prompt text as measured before sending
    filler_words: int | None = None
    error: str | None = None
    http_status: int | None = None


@dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    trials: int  # trials run (fewer than planned after Ctrl-C)
    correct: int
    errors: int

    @property
    def accuracy(self) -> float | None:
        """Correct / trials run, errors counted as misses; None when nothing ran."""
        return self.correct / self.trials if self.trials else None


@dataclass
class ProbeResult:
    settings: ProbeSettings
    model: str
    token_counting: str  # how lengths were measured
    lengths_exact: bool  # False: lengths are ~4 characters per token estimates
    started_at: str
    trials: list[Trial] = field(default_factory=list)
    finished_at: str | None = None
    interrupted: bool = False  # Ctrl-C
    stopped_by: LaunchError | None = None  # the error that ended the sweep early (server gone)

    def cell(self, length: int, depth: float) -> Cell:
        runs = [t for t in self.trials if t.length == length and t.depth == depth]
        return Cell(length, depth, len(runs), sum(t.correct for t in runs), sum(t.error is not None for t in runs))

    def cells(self) -> list[Cell]:
        return [self.cell(length, depth) for length in self.settings.lengths for depth in self.settings.depths]

    @property
    def complete(self) -> bool:
        return len(self.trials) == self.settings.planned_trials

    @property
    def overall_accuracy(self) -> float:
        """Correct / trials run, errors counted as misses (a length the server refuses is not a pass)."""
        return sum(t.correct for t in self.trials) / len(self.trials) if self.trials else 0.0


@dataclass(frozen=True)
class ProgressEvent:
    """``begin``: what the sweep will do, before the first request; ``notice``: a one-line warning;
    ``start``: a trial is about to be sent; ``done``: it was scored."""

    kind: Literal["begin", "notice", "start", "done"]
    done: int = 0
    total: int = 0
    length: int = 0
    depth: float = 0.0
    trial_index: int = 0
    trial: Trial | None = None
    message: str = ""


Progress = Callable[[ProgressEvent], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pick_model(client: Client, wanted: str | None) -> str:
    models = client.models()
    if wanted is None:
        if not models:
            raise ProbeNoModel(client.shown)
        return models[0]
    if models and wanted not in models:
        raise ProbeUnknownModel(wanted, tuple(printable(m) for m in models))  # the server's names
    return wanted


def run_probe(settings: ProbeSettings, progress: Progress | None = None) -> ProbeResult:
    """Run the sweep. Raises (before any trial) when the server is unreachable, refuses the key, or
    lacks the model; returns a result with ``interrupted`` / ``stopped_by`` set when it ended early."""
    emit = progress or (lambda event: None)
    client = Client(settings.url, settings.api_key, settings.timeout)
    with waiting_notice(client, lambda line: emit(ProgressEvent("begin", message=line))):
        model = _pick_model(client, settings.model)
        counter = pick_counter(client, model, settings.tokenizer)
    if not counter.exact:
        emit(ProgressEvent("notice", message=(
            f"{client.shown} has no tokenize endpoint and no --tokenizer was given: lengths are "
            f"estimates ({counter.method.split(': ', 1)[1]})")))
    result = ProbeResult(settings, model, counter.method, counter.exact, _now())
    # The shortest length must hold the intro, passkey line and question with no filler at all.
    base = counter.count(build_prompt(Filler(settings.seed, 0), "00000", 0.0, 0).text)
    if base > min(settings.lengths):
        raise ProbeLengthTooShort(min(settings.lengths), base)
    total = settings.planned_trials
    emit(ProgressEvent("begin", 0, total, message=(
        f"probing {client.shown}, model {model}: {len(settings.lengths)} length(s) x {len(settings.depths)} "
        f"depth(s) x {settings.trials} trial(s) = {total} prompts; each request has a {settings.timeout:g} s deadline")))
    try:
        _sweep(settings, client, model, counter, result, emit, total)
    except KeyboardInterrupt:
        result.interrupted = True
    result.finished_at = _now()
    return result


def _measure(counter: TokenCounter, filler: Filler, passkey: str, depth: float) -> Callable[[int], int]:
    """Tokens of the whole prompt as a function of the filler words in it."""
    return lambda n: counter.count(build_prompt(filler, passkey, depth, n).text)


def _sweep(settings: ProbeSettings, client: Client, model: str, counter: TokenCounter,
           result: ProbeResult, emit: Progress, total: int) -> None:
    fillers = {t: Filler(settings.seed, t) for t in range(settings.trials)}
    fit_state = {"tokens_per_word": 1.3}  # first guess; each fit refines it, so later fits need fewer counts
    watch = StuckWatch(client)
    for length in settings.lengths:
        for depth in settings.depths:
            for index in range(settings.trials):
                emit(ProgressEvent("start", len(result.trials), total, length, depth, index))
                trial = Trial(length, depth, index, passkey_for(settings.seed, length, depth, index))
                error, fatal = _ask(settings, client, model, counter, fillers[index], trial, fit_state)
                # Appended only once finished: a trial cut by Ctrl-C is not a result.
                result.trials.append(trial)
                emit(ProgressEvent("done", len(result.trials), total, length, depth, index, trial))
                result.stopped_by = fatal or watch.after(error)
                if result.stopped_by is not None:
                    return


def _ask(settings: ProbeSettings, client: Client, model: str, counter: TokenCounter, filler: Filler,
         trial: Trial, fit_state: dict) -> tuple[LaunchError | None, LaunchError | None]:
    """Fill in ``trial``: build its prompt, ask, score. Returns ``(error, fatal)``: what spoiled this
    trial (None: answered), and the error that must end the sweep (the server gone, the key refused)."""
    try:
        fit = fit_words(_measure(counter, filler, trial.passkey, trial.depth), trial.length,
                        fit_state["tokens_per_word"])
        trial.measured_tokens, trial.filler_words = fit.tokens, fit.words
        if fit.words and fit.tokens > fit.base:
            fit_state["tokens_per_word"] = (fit.tokens - fit.base) / fit.words
        prompt = build_prompt(filler, trial.passkey, trial.depth, fit.words)
        reply = client.chat(model, prompt.text, settings.max_tokens)
    except (Unreachable, ServerUnauthorized) as err:
        trial.error = str(err)
        return err, err
    except ServerHTTPError as err:  # e.g. 400: the prompt is past the server's session
        trial.error, trial.http_status, error = f"HTTP {err.status}: {err.detail}", err.status, err
    except ServerErrorBody as err:  # HTTP 200 carrying an error (lmdeploy's proxy): not an answer
        trial.error, trial.http_status, error = f"error_code {err.code}: {err.detail}", 200, err
    except LaunchError as err:  # a deadline, a reply of the wrong shape: this trial only
        trial.error, error = str(err), err
    else:
        trial.latency_s = round(reply.latency_s, 3)
        if reply.text.strip():
            trial.answer = reply.text
            trial.prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else fit.tokens
            trial.correct = is_correct(trial.passkey, reply.text)
            return None, None
        # content null, absent, empty or blank (reasoning_content too): a reply, but no answer in it
        error = ServerBadReply(client.shown + "/v1/chat/completions", NO_ANSWER_TEXT)
        trial.error = str(error)
    trial.prompt_tokens = trial.measured_tokens
    return error, None
