"""The run: tokenize each text once, cut one window per length, score each window and its prefix
through lmdeploy's ``POST /get_ppl``, derive the target span's loss.

``run_ppl`` checks the server first (reachable, key accepted, which model, ``/get_ppl`` there, how to
tokenize, every window fits the text), so those failures stop it before any long scoring pass.
Whatever else the check's short ``/get_ppl`` meets (a deadline, an HTTP error, a reply that is no
loss) is a window's failure, not the run's: the windows are scored and each records its own, as
probe's trials do. A length the server refuses (a 400: past its session) is recorded on its point
and the run goes on. Ctrl-C, a server that goes away, or ``STUCK_AFTER`` requests in a row past their
deadline end the run early with the points so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from launcher.errors import LaunchError
from launcher.eval.deadlines import StuckWatch, waiting_notice
from launcher.eval.ppl.settings import PplSettings
from launcher.eval.ppl.text import Text, load_texts
from launcher.eval.ppl.windows import Window, plan_windows, span_loss
from launcher.eval.probe.runner import ProbeNoModel
from launcher.net.http import Unreachable
from launcher.net.lmdeploy import Client, ServerBadReply, ServerErrorBody, ServerHTTPError, ServerUnauthorized


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


@dataclass
class Point:
    """One window of one text, scored. ``error`` set: not scored (the losses are None)."""

    text: str
    length: int
    span: int
    window_loss: float | None = None  # mean over the window's length - 1 targets (what /get_ppl says)
    prefix_loss: float | None = None  # mean over the prefix's targets
    span_loss: float | None = None  # mean over the last ``span`` tokens
    seconds: float | None = None
    error: str | None = None
    http_status: int | None = None


@dataclass
class PplResult:
    settings: PplSettings
    model: str
    tokenization: str
    text_tokens: dict[str, int]
    started_at: str
    points: list[Point] = field(default_factory=list)
    finished_at: str | None = None
    interrupted: bool = False
    stopped_by: LaunchError | None = None

    @property
    def label(self) -> str:
        return self.settings.label or self.model

    @property
    def planned(self) -> int:
        return len(self.text_tokens) * len(self.settings.lengths)

    @property
    def complete(self) -> bool:
        return len(self.points) == self.planned and not any(p.error for p in self.points)

    def mean_over_texts(self, length: int, attr: str) -> float | None:
        """The mean of ``attr`` over the texts scored at ``length`` (None when none was)."""
        values = [getattr(p, attr) for p in self.points if p.length == length and getattr(p, attr) is not None]
        return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class PplEvent:
    """``begin``: what the run will do; ``start``: a window is being scored; ``done``: it was."""

    kind: Literal["begin", "start", "done"]
    done: int = 0
    total: int = 0
    point: Point | None = None
    message: str = ""


Progress = Callable[[PplEvent], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def score(client: Client, ids: list[int]) -> float:
    """lmdeploy's ``POST /get_ppl`` for token ids: the mean next-token loss; ``PplNoEndpoint`` when
    the server has none."""
    try:
        return client.ppl(ids)
    except ServerHTTPError as err:
        if err.status in (404, 405):
            raise PplNoEndpoint(client.shown, err.status) from None
        raise


def _tokenizer(client: Client, tokenizer_dir: str | None) -> tuple[str, Callable[[str], list[int]]]:
    """The server's ``/v1/encode`` when it has one, else ``--tokenizer DIR``."""
    try:
        client.encode_ids("The quick brown fox.")
        return "server: POST /v1/encode", client.encode_ids
    except (ServerHTTPError, ServerBadReply):
        if tokenizer_dir is None:
            raise PplNoTokenizer(client.shown) from None
    from launcher.eval.tokens import TokenizerDir

    local = TokenizerDir(tokenizer_dir)
    return local.method, local.ids


def run_ppl(settings: PplSettings, progress: Progress | None = None) -> PplResult:
    """Run it. Raises (before any scoring pass) when the server is unreachable, refuses the key, has
    no ``/get_ppl``, or a window is longer than a text; returns a result with ``interrupted`` /
    ``stopped_by`` set when it ended early."""
    emit = progress or (lambda event: None)
    texts = load_texts(settings.texts)
    client = Client(settings.url, settings.api_key, settings.timeout)
    with waiting_notice(client, lambda line: emit(PplEvent("begin", message=line))):
        models = client.models()
        if not models:
            raise ProbeNoModel(client.shown)
        method, encode = _tokenizer(client, settings.tokenizer)
        token_ids = [encode(text.content) for text in texts]
        plans = [plan_windows(len(ids), settings.lengths, settings.span, text.source)
                 for text, ids in zip(texts, token_ids)]
        checked = _check_endpoint(client, token_ids[0][:2])
    result = PplResult(settings, models[0], method, {t.source: len(ids) for t, ids in zip(texts, token_ids)}, _now())
    total = result.planned
    emit(PplEvent("begin", 0, total, message=(
        f"scoring {total} window(s) on {client.shown}, model {result.model}: lengths "
        f"{', '.join(str(n) for n in settings.lengths)}, target span the last {settings.span} tokens; "
        f"each request has a {settings.timeout:g} s deadline")))
    watch = StuckWatch(client)
    watch.after(checked)  # a check past its deadline is the first miss in a row
    try:
        for text, ids, windows in zip(texts, token_ids, plans):
            for window in windows:
                emit(PplEvent("start", len(result.points), total, Point(text.source, window.length, window.span)))
                point, error, fatal = _score_window(client, text, ids, window)
                result.points.append(point)
                emit(PplEvent("done", len(result.points), total, point))
                # The server went away, turned the key down, or keeps missing its deadline: stop here.
                result.stopped_by = fatal or watch.after(error)
                if result.stopped_by is not None:
                    result.finished_at = _now()
                    return result
    except KeyboardInterrupt:
        result.interrupted = True
    result.finished_at = _now()
    return result


def _check_endpoint(client: Client, ids: list[int]) -> LaunchError | None:
    """Score ``ids`` (2 tokens) before any long pass: raises what ends every window alike (the server
    unreachable, the key refused, no ``/get_ppl``); returns any other failure (None: it answered)."""
    try:
        score(client, ids)
    except (Unreachable, ServerUnauthorized, PplNoEndpoint):
        raise
    except LaunchError as err:  # a deadline, an HTTP error, an error body, a reply that is no loss
        return err
    return None


def _score_window(client: Client, text: Text, ids: list[int],
                  window: Window) -> tuple[Point, LaunchError | None, LaunchError | None]:
    """The scored point, what spoiled it (None: scored), and the error that must end the run."""
    point = Point(text.source, window.length, window.span)
    error = fatal = None
    started = time.monotonic()
    window_ids = ids[window.start: window.end]
    try:
        # The window first, then its prefix: an engine with a prefix cache (or the tests' stand-in)
        # can answer the second from the first; the numbers do not depend on the order.
        point.window_loss = score(client, window_ids)
        point.prefix_loss = score(client, window_ids[: window.prefix_length])
        loss = span_loss(point.window_loss, window.length, point.prefix_loss, window.prefix_length)
        if not math.isfinite(loss):
            raise ServerBadReply(client.shown + "/get_ppl", "the two scores give no finite span loss")
        point.span_loss = loss
    except (Unreachable, ServerUnauthorized, PplNoEndpoint) as err:
        point.error, error, fatal = str(err), err, err
    except ServerHTTPError as err:  # e.g. 400: the window is past the server's session
        point.error, point.http_status, error = f"HTTP {err.status}: {err.detail}", err.status, err
    except ServerErrorBody as err:
        point.error, point.http_status, error = f"error_code {err.code}: {err.detail}", 200, err
    except LaunchError as err:  # a deadline, a reply of the wrong shape: this point only
        point.error, error = str(err), err
    point.seconds = round(time.monotonic() - started, 3)
    return point, error, fatal
