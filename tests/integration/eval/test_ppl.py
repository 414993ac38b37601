"""``launch ppl`` against the stand-in lmdeploy server (real HTTP on 127.0.0.1): windows, the span
loss, outputs, compare charts and errors. The real model is in tests/real_model/test_ppl_real_model.py."""

from __future__ import annotations

import json

import pytest

from launcher.eval.ppl import (
    PplSettings,
    format_table,
    load_run,
    plan_windows,
    run_ppl,
    span_loss,
    write_outputs,
)
from launcher.eval.ppl.chart import CHART_SIZE_PX
from launcher.eval.ppl.runner import PplNoEndpoint, PplNoTokenizer
from launcher.eval.ppl.text import default_text_path
from launcher.eval.ppl.windows import PplTextTooShort
from launcher.eval.results import CompareBadRun
from launcher.net.http import Unreachable
from launcher.net.lmdeploy import ServerUnauthorized
from launcher.rules.checks import BadOption
from tests.conftest import assert_one_line_error, run_launch
from tests.support.probe_standin import ProbeStandin, closed_port_url, png_size, token_ids, tokenize

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

VISIBLE = 1000


@pytest.fixture(autouse=True)
def no_key_env(monkeypatch):
    monkeypatch.delenv("LAUNCH_API_KEY", raising=False)


def expected_span(server: ProbeStandin, length: int, span: int) -> float:
    """The stand-in's loss of the last ``span`` targets of a ``length``-token window."""
    return sum(server.loss_at(i) for i in range(length - span, length)) / span


# --- windows and the span formula (pure) ---------------------------------------------------------


def test_windows_end_at_the_text_end_and_too_long_ones_are_refused():
    windows = plan_windows(10_000, (8000, 2000, 4000), 500, "t.txt")
    assert [(w.length, w.start, w.end) for w in windows] == [(2000, 8000, 10_000), (4000, 6000, 10_000),
                                                             (8000, 2000, 10_000)]
    assert {w.prefix_length for w in windows} == {1500, 3500, 7500}
    with pytest.raises(PplTextTooShort) as info:
        plan_windows(10_000, (4000, 12_000), 500, "t.txt")
    assert (info.value.length, info.value.available) == (12_000, 10_000)
    assert "t.txt has 10000 tokens" in str(info.value)


def test_span_loss_recovers_the_mean_of_the_last_tokens():
    losses = [0.5 + 0.37 * (i % 7) + i / 100 for i in range(1, 60)]  # targets 1..59 of a 60-token input
    n, span = 60, 13
    mean_window = sum(losses) / (n - 1)
    mean_prefix = sum(losses[: n - span - 1]) / (n - span - 1)
    assert span_loss(mean_window, n, mean_prefix, n - span) == pytest.approx(sum(losses[-span:]) / span)
    with pytest.raises(ValueError):
        span_loss(1.0, 10, 1.0, 1)


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"lengths": (100,), "span": 99}, "--span"),
    ({"lengths": (100,), "span": 0}, "--span"),
    ({"lengths": (0,)}, "--lengths"),
    ({"lengths": (100,), "timeout": float("nan")}, "--timeout"),
    ({"lengths": (100,), "native_context": -1}, "--native"),
    ({"lengths": (100,), "url": "ftp://x"}, "--url"),
])
def test_settings_refuse_bad_values(kwargs, option):
    kwargs.setdefault("span", 10)
    with pytest.raises(BadOption) as info:
        PplSettings(**kwargs)
    assert info.value.option == option


def test_the_bundled_text_is_long_enough_for_twice_an_8k_context():
    text = default_text_path().read_text(encoding="utf-8")
    assert len(text) > 80_000 and "public domain" in (default_text_path().parent / "SOURCE.md").read_text()
    # The stand-in counts words and marks; a Llama tokenizer gives ~20k (SOURCE.md; real-model test).
    assert len(tokenize(text)) > 16_384


# --- a run against the stand-in ------------------------------------------------------------------


def test_span_and_window_losses_match_what_the_server_scored(tmp_path):
    text = default_text_path().read_text(encoding="utf-8")
    ids = token_ids(tokenize(text))
    with ProbeStandin(visible=VISIBLE, session_len=100_000) as server:
        result = run_ppl(PplSettings(url=server.url, lengths=(2000, 500, 1000, 4000), span=250,
                                     native_context=VISIBLE))
        scored = list(server.ppl_inputs)
    assert result.complete and result.model == "standin-7b-chat"
    assert result.tokenization == "server: POST /v1/encode"
    # Each window is the last N tokens of the text, then its prefix without the span (after one 2-token check).
    assert scored[0] == ids[:2]
    for i, length in enumerate((500, 1000, 2000, 4000)):
        assert scored[1 + 2 * i] == ids[-length:]
        assert scored[2 + 2 * i] == ids[-length:][: length - 250]
    for point in result.points:
        assert point.window_loss == pytest.approx(server.mean_loss(point.length))
        assert point.span_loss == pytest.approx(expected_span(server, point.length, 250))
    by_length = {p.length: p.span_loss for p in result.points}
    assert by_length[500] == by_length[1000] == pytest.approx(2.0)  # flat within the "native" context
    assert by_length[4000] > by_length[2000] > 2.0 + 1  # rising past it

    paths = write_outputs(result, tmp_path / "run")
    data = json.loads(paths.results_json.read_text())
    assert data["kind"] == "launch-ppl" and data["complete"] and len(data["points"]) == 4
    assert [row["length"] for row in data["lengths"]] == [500, 1000, 2000, 4000]
    assert data["lengths"][3]["span_loss"] == pytest.approx(by_length[4000])
    assert png_size(paths.chart_png) == CHART_SIZE_PX
    table = format_table(result)
    row_2000 = next(line for line in table.splitlines() if line.split()[1:2] == ["2000"])
    assert f"{by_length[2000]:.3f}" in row_2000 and "2x" in row_2000
    assert load_run(tmp_path / "run").rows[2].span_loss == pytest.approx(by_length[2000])


def test_several_texts_are_averaged_per_length(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma. " * 400)  # 1600 tokens
    b.write_text("one two three four, " * 300)  # 1500 tokens
    with ProbeStandin(visible=VISIBLE, session_len=100_000) as server:
        result = run_ppl(PplSettings(url=server.url, lengths=(1200, 600), span=100, texts=(a, b)))
    assert result.text_tokens == {str(a): 1600, str(b): 1500}
    assert len(result.points) == 4
    assert result.mean_over_texts(1200, "span_loss") == pytest.approx(expected_span(server, 1200, 100))


def test_a_window_past_the_servers_session_is_recorded_and_the_run_goes_on():
    with ProbeStandin(visible=VISIBLE, session_len=1500) as server:
        result = run_ppl(PplSettings(url=server.url, lengths=(1000, 2000), span=100))
    ok, refused = result.points
    assert ok.error is None and ok.span_loss is not None
    assert refused.http_status == 400 and "must be smaller than the model context length (1500)" in refused.error
    assert refused.span_loss is None and not result.complete
    assert "ERR" in format_table(result)


def test_ctrl_c_keeps_the_windows_so_far(tmp_path):
    def progress(event):
        if event.kind == "start" and event.done == 1:
            raise KeyboardInterrupt

    from launcher.eval.ppl import runner

    with ProbeStandin(visible=VISIBLE, session_len=100_000) as server:
        result = runner.run_ppl(PplSettings(url=server.url, lengths=(500, 1000, 2000), span=100), progress=progress)
    assert result.interrupted and [p.length for p in result.points] == [500]
    paths = write_outputs(result, tmp_path / "partial")
    assert json.loads(paths.results_json.read_text())["interrupted"] is True
    assert "interrupted: 1 of 3" in format_table(result)


# --- errors ----------------------------------------------------------------------------------------


def test_unreachable_is_one_line_and_writes_nothing(tmp_path):
    url = closed_port_url()
    proc = run_launch("ppl", "--url", url, "--lengths", "500", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, url, "connection refused", code=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Unreachable):
        run_ppl(PplSettings(url=url, lengths=(500,), span=100))


def test_a_key_is_needed_and_nothing_is_scored_without_it():
    with ProbeStandin(visible=VISIBLE, api_keys=("sesame",)) as server:
        with pytest.raises(ServerUnauthorized) as info:
            run_ppl(PplSettings(url=server.url, lengths=(500,), span=100))
        assert "--api-key" in str(info.value) and server.ppl_inputs == []
        result = run_ppl(PplSettings(url=server.url, lengths=(500,), span=100, api_key="sesame"))
    assert result.complete


def test_windows_longer_than_the_text_are_refused_before_any_scoring(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only. " * 50)  # 250 tokens
    with ProbeStandin(visible=VISIBLE) as server:
        proc = run_launch("ppl", "--url", server.url, "--text", str(short), "--lengths", "100,300", "--span", "50",
                          "--out", str(tmp_path / "o"))
        assert server.ppl_inputs == []
    assert_one_line_error(proc, "a window of 300 tokens is longer than the text", "has 250 tokens", code=2)
    assert not (tmp_path / "o").exists()


def test_servers_without_get_ppl_or_a_tokenizer_are_refused():
    with ProbeStandin(visible=VISIBLE, ppl=False) as server, pytest.raises(PplNoEndpoint) as info:
        run_ppl(PplSettings(url=server.url, lengths=(500,), span=100))
    assert "no POST /get_ppl (HTTP 404)" in str(info.value)
    with ProbeStandin(visible=VISIBLE, encode=False) as server:
        with pytest.raises(PplNoTokenizer) as info2:
            run_ppl(PplSettings(url=server.url, lengths=(500,), span=100))
        assert server.ppl_inputs == []
    assert "--tokenizer DIR" in str(info2.value)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--lengths", "abc"], "--lengths 'abc'"),
    (["--lengths", "1x"], "--native"),
    (["--lengths", "500", "--span", "600"], "--span '600'"),
    (["--lengths", "500", "--text", "/nonexistent/t.txt"], "--text '/nonexistent/t.txt'"),
    (["--lengths", "500", "--native", "8192", "--preset", "llama-2-7b-chat"], "--preset"),
    (["--lengths", "500", "somedir"], "run directories are for --compare"),
    (["--compare"], "--compare"),
])
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, flags, needle):
    proc = run_launch("ppl", "--url", closed_port_url(), *flags, "--out", str(tmp_path / "o"), cwd=str(tmp_path))
    assert_one_line_error(proc, needle, code=2)
    assert list(tmp_path.iterdir()) == []


# --- compare charts --------------------------------------------------------------------------------


def _ppl_run(server: ProbeStandin, out, label: str) -> None:
    proc = run_launch("ppl", "--url", server.url, "--lengths", "500,1000,2000", "--native", "1000",
                      "--label", label, "--out", str(out))
    assert proc.returncode == 0, proc.stderr


def test_ppl_compare_draws_runs_on_one_chart_and_one_table(tmp_path):
    with ProbeStandin(visible=VISIBLE, session_len=100_000) as before:
        _ppl_run(before, tmp_path / "before", "as shipped")
    with ProbeStandin(visible=2000, session_len=100_000, base_loss=2.2) as after:
        _ppl_run(after, tmp_path / "after", "patched")
    proc = run_launch("ppl", "--compare", str(tmp_path / "before"), str(tmp_path / "after"),
                      "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[-3:-2] and "000" in line]
    shipped = {r[2]: float(r[4]) for r in rows if r[:2] == ["as", "shipped"]}
    patched = {r[1]: float(r[3]) for r in rows if r[0] == "patched"}
    assert shipped["2000"] > shipped["1000"] + 1 and patched["2000"] == pytest.approx(2.2)
    assert png_size(tmp_path / "cmp" / "ppl-compare.png") == CHART_SIZE_PX
    again = run_launch("ppl", "--compare", str(tmp_path / "before"), "--out", str(tmp_path / "cmp"))
    assert_one_line_error(again, "already holds ppl-compare.png", code=2)


def test_compare_refuses_what_launch_ppl_did_not_write(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"version": 1, "cells": []}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    for bad, needle in ((tmp_path / "other", "was not written by `launch ppl`"),
                        (tmp_path / "broken", "cannot read results.json"),
                        (tmp_path / "missing", "no results.json there")):
        with pytest.raises(CompareBadRun) as info:
            load_run(bad)
        assert needle in str(info.value)
    proc = run_launch("ppl", "--compare", str(tmp_path / "other"), "--out", str(tmp_path / "cmp"))
    assert_one_line_error(proc, "--compare", code=2)
    assert not (tmp_path / "cmp").exists()


def test_probe_compare_puts_heatmaps_side_by_side(tmp_path):
    runs = []
    for visible, name in ((1000, "short-sight"), (3000, "long-sight")):
        with ProbeStandin(visible=visible, session_len=100_000) as server:
            out = tmp_path / name
            proc = run_launch("probe", "--url", server.url, "--lengths", "500,2000", "--depths", "0,1",
                              "--trials", "1", "--native", "1000", "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            runs.append(out)
    proc = run_launch("probe", "--compare", *map(str, runs), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(tmp_path / "cmp" / "heatmap-compare.png")
    assert width > 1.5 * height  # two panels side by side
    assert proc.stdout.count("overall accuracy") == 2
    assert "standin-7b-chat (short-sight)" in proc.stdout and "standin-7b-chat (long-sight)" in proc.stdout
    accuracies = [line for line in proc.stdout.splitlines() if line.startswith("overall accuracy")]
    assert accuracies[0].startswith("overall accuracy 0.75") and accuracies[1].startswith("overall accuracy 1.00")
    bad = run_launch("probe", "--compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "cmp2"))
    assert_one_line_error(bad, "no results.json there", code=2)


# --- serve --probe --ppl-text ----------------------------------------------------------------------


def test_serve_probe_hook_also_measures_ppl_when_given_a_text(tmp_path):
    """The hook serve runs once its server is ready, against a running stand-in server."""
    import io
    from types import SimpleNamespace

    from launcher.app.serveprobe import probe_hook

    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven. " * 200)  # 1600 tokens
    plan = SimpleNamespace(decision=SimpleNamespace(native_context=512, session_len=1200))
    out = io.StringIO()
    with ProbeStandin(visible=512, session_len=1200) as server:
        info = SimpleNamespace(root_url=server.url, model_name=server.model, api_key=None)
        finish = probe_hook(plan, tmp_path / "run", out, text)(info)
        scored = [len(ids) for ids in server.ppl_inputs]
        finish()
    ppl_dir = next((tmp_path / "run").glob("ppl-*"))
    data = json.loads((ppl_dir / "results.json").read_text())
    # the probe's lengths: 0.5x, 1x, 1.5x, and 2x capped to what a session of 1200 takes
    assert [row["length"] for row in data["lengths"]] == [256, 512, 768, 1008] and data["complete"]
    assert scored[1:] == [256, 128, 512, 384, 768, 640, 1008, 880] and data["settings"]["span"] == 128
    assert next((tmp_path / "run").glob("probe-*/results.json")).is_file()
    printed = out.getvalue()
    assert "overall accuracy" in printed and "span loss" in printed and f"wrote {ppl_dir}" in printed

    short = tmp_path / "short.txt"
    short.write_text("too short. " * 30)
    out = io.StringIO()
    with ProbeStandin(visible=512, session_len=1200) as server:
        info = SimpleNamespace(root_url=server.url, model_name=server.model, api_key=None)
        probe_hook(plan, tmp_path / "run2", out, short)(info)()
    assert "launch: warning: no ppl measurement: a window of 1008 tokens is longer than the text" in out.getvalue()
    assert not list((tmp_path / "run2").glob("ppl-*"))


def test_serve_ppl_text_needs_probe_and_a_file(tmp_path):
    proc = run_launch("serve", "internlm2_5-7b-chat", "--dry-run", "--ppl-text", str(tmp_path / "t.txt"),
                      env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(proc, "--ppl-text", "add --probe", code=2)
    proc = run_launch("serve", "internlm2_5-7b-chat", "--dry-run", "--probe", "--ppl-text", str(tmp_path / "t.txt"),
                      env={"LAUNCH_CACHE_DIR": str(tmp_path / "c")})
    assert_one_line_error(proc, "--ppl-text", "not a file", code=2)
    assert not (tmp_path / "c").exists()


def test_a_silent_server_ends_within_the_timeout_with_a_line_before(tmp_path):
    import time

    from tests.support.servers import RawServer

    with RawServer("silent") as server:
        start = time.monotonic()
        proc = run_launch("ppl", "--url", server.url, "--lengths", "500", "--timeout", "2", "--out",
                          str(tmp_path / "o"))
        elapsed = time.monotonic() - start
    assert elapsed < 2 + 30 and proc.returncode == 1  # the server never answers: ending is the point
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"launch: waiting for {server.url}") and len(lines) == 2
    assert lines[1] == f"launch: error: {server.url}/v1/models did not answer within 2 s."
    assert not (tmp_path / "o").exists()


def test_a_proxys_http_200_error_body_is_an_error_not_a_loss():
    """Every /get_ppl (the check before the windows included) answers lmdeploy's proxy error body:
    each window records it as its error, and none has a loss."""
    with ProbeStandin(visible=VISIBLE, proxy_error=True) as server:
        result = run_ppl(PplSettings(url=server.url, lengths=(500, 1000), span=100))
        calls = server.ppl_calls
    assert calls == 3 and len(result.points) == 2 and not result.complete  # the check, then each window once
    for point in result.points:
        assert point.error.startswith("error_code 10402: ") and point.http_status == 200
        assert (point.window_loss, point.prefix_loss, point.span_loss) == (None, None, None)
