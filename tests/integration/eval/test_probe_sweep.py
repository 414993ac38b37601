"""``run_probe`` against a stand-in lmdeploy server (real HTTP on 127.0.0.1): scoring, outputs, errors."""

from __future__ import annotations

import json
import re

import pytest

from launcher.eval.probe import ProbeSettings, format_table, run_probe, write_outputs
from launcher.eval.probe.chart import AXES_RECT, HEATMAP_SIZE_PX
from launcher.eval.probe.passkey import Filler, build_prompt
from launcher.eval.probe.runner import ProbeUnknownModel
from launcher.eval.tokens import ProbeLengthTooShort, ProbeTokenizerFailed
from launcher.net.http import Unreachable
from launcher.net.lmdeploy import ServerUnauthorized
from tests.support.probe_standin import ProbeStandin, closed_port_url, passkey_end, png_size, tokenize

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

K = 1000


def sweep(server: ProbeStandin, **overrides) -> ProbeSettings:
    args = {"url": server.url, "lengths": (500, 1000, 2000), "depths": (0.0, 0.5, 1.0), "trials": 3, "seed": 0}
    args.update(overrides)
    return ProbeSettings(**args)


def table_cells(table: str) -> dict[tuple[int, float], str]:
    """(length, depth) -> cell text, read back from the terminal table."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("depth"))
    lengths = [int(x) for x in re.findall(r"\d+", header)]
    cells = {}
    for line in lines:
        if re.match(r"^\d\.\d\d ", line):
            depth, *texts = line.split()
            cells.update({(length, float(depth)): text for length, text in zip(lengths, texts, strict=True)})
    return cells


def test_finds_the_passkey_exactly_where_the_model_can_see_it(tmp_path):
    with ProbeStandin(visible=K) as server:
        result = run_probe(sweep(server))
        prompts = list(server.prompts)
    assert result.model == "standin-7b-chat" and result.lengths_exact
    assert result.token_counting == "server: POST /v1/encode"
    assert len(result.trials) == 27 == len(prompts)
    for trial, prompt in zip(result.trials, prompts, strict=True):
        assert trial.passkey in prompt and trial.error is None
        # Lengths are in the model's tokens: the message text is the target (within a word).
        assert trial.length - 3 <= len(tokenize(prompt)) == trial.measured_tokens <= trial.length
        assert trial.prompt_tokens > trial.measured_tokens  # the server counts its chat template too
        assert trial.correct == (passkey_end(prompt, trial.passkey) <= K), trial
        assert trial.answer and trial.latency_s is not None and trial.latency_s >= 0
    for depth in (0.0, 0.5, 1.0):
        assert result.cell(500, depth).accuracy == 1.0
        assert result.cell(1000, depth).accuracy == 1.0
    assert result.cell(2000, 0.0).accuracy == 1.0
    assert result.cell(2000, 1.0).accuracy == 0.0
    assert result.cell(2000, 0.5).accuracy == 0.0
    assert result.overall_accuracy == pytest.approx(21 / 27)


def test_json_agrees_with_the_table_and_records_every_trial(tmp_path):
    with ProbeStandin(visible=K) as server:
        result = run_probe(sweep(server, native_context=1000, api_key=None))
    paths = write_outputs(result, tmp_path / "out")
    data = json.loads(paths.results_json.read_text())
    table = format_table(result)
    from_table = table_cells(table)
    assert len(from_table) == 9
    for cell in data["cells"]:
        assert from_table[(cell["length"], cell["depth"])] == f"{cell['accuracy']:.2f}"
        runs = [t for t in data["trials"] if t["length"] == cell["length"] and t["depth"] == cell["depth"]]
        assert cell["correct"] == sum(t["correct"] for t in runs) and cell["trials"] == len(runs) == 3
    assert len(data["trials"]) == 27
    assert set(data["trials"][0]) >= {"length", "depth", "passkey", "answer", "correct", "latency_s",
                                      "prompt_tokens", "error"}
    assert data["settings"]["seed"] == 0 and data["settings"]["native_context"] == 1000
    assert data["token_counting"]["exact"] is True and data["complete"] is True
    assert f"overall accuracy {data['overall_accuracy']:.2f}" in table
    assert "1x" in table and "2x" in table  # multiples of the native context label the columns


def test_heatmap_is_a_png_whose_cells_show_the_accuracy(tmp_path):
    from PIL import Image

    with ProbeStandin(visible=K) as server:
        result = run_probe(sweep(server, native_context=1000))
    paths = write_outputs(result, tmp_path)
    assert paths.heatmap_png == tmp_path / "heatmap.png"
    assert png_size(paths.heatmap_png) == HEATMAP_SIZE_PX
    image = Image.open(paths.heatmap_png).convert("RGB")
    assert image.size == HEATMAP_SIZE_PX
    width, height = image.size
    left, bottom, ax_w, ax_h = AXES_RECT

    def colour(ix: int, iy: int) -> tuple[int, int, int]:
        """A pixel inside cell (length index, depth index), away from the value written in it."""
        x = (left + ax_w * (ix + 0.15) / 3) * width
        y = (1 - bottom - ax_h) * height + ax_h * height * (iy + 0.15) / 3
        return image.getpixel((int(x), int(y)))

    for iy in range(3):
        r, g, _ = colour(0, iy)  # 500 tokens: always found -> green
        assert g > r + 60
    r, g, _ = colour(2, 2)  # 2000 tokens at depth 1: never found -> red
    assert r > g + 60


def test_same_seed_same_prompts_other_seed_other_passkeys():
    with ProbeStandin(visible=K) as server:
        first = run_probe(sweep(server, lengths=(600,), trials=2))
        first_prompts = list(server.prompts)
        server.prompts.clear()
        again = run_probe(sweep(server, lengths=(600,), trials=2))
        assert server.prompts == first_prompts
        other = run_probe(sweep(server, lengths=(600,), trials=2, seed=1))
    assert [t.passkey for t in again.trials] == [t.passkey for t in first.trials]
    assert all(a.passkey != b.passkey for a, b in zip(first.trials, other.trials, strict=True))


def test_a_length_past_the_session_is_an_error_cell_and_the_sweep_goes_on(tmp_path):
    with ProbeStandin(visible=5000, session_len=1500) as server:
        result = run_probe(sweep(server, lengths=(500, 2000, 1000), depths=(0.0, 1.0), trials=2))
    assert result.complete and result.stopped_by is None
    assert [t.length for t in result.trials] == [500] * 4 + [1000] * 4 + [2000] * 4  # all of them ran
    long = [t for t in result.trials if t.length == 2000]
    assert all(t.http_status == 400 and "must be smaller than the model context length (1500)" in t.error
               for t in long)
    assert all(not t.correct and t.answer is None for t in long)
    assert result.cell(1000, 1.0).accuracy == 1.0
    cells = table_cells(format_table(result))
    assert cells[(2000, 0.0)] == cells[(2000, 1.0)] == "ERR"
    assert cells[(500, 0.0)] == "1.00"
    data = json.loads(write_outputs(result, tmp_path).results_json.read_text())
    errors = {c["length"]: c["errors"] for c in data["cells"]}
    assert errors == {500: 0, 1000: 0, 2000: 2}
    assert data["overall_accuracy"] == pytest.approx(8 / 12)  # the refused length counts as missed


def test_nonsense_answers_are_scored_wrong_and_recorded():
    with ProbeStandin(visible=K, reply="Banana banana, the sky is 7 colours.") as server:
        result = run_probe(sweep(server, lengths=(500,), depths=(0.0, 1.0), trials=2))
    assert result.overall_accuracy == 0.0
    assert all(t.answer == "Banana banana, the sky is 7 colours." and t.error is None for t in result.trials)


def test_unreachable_server_stops_before_any_trial():
    url = closed_port_url()
    with pytest.raises(Unreachable) as info:
        run_probe(ProbeSettings(url=url, lengths=(500,)))
    message = str(info.value)
    assert url in message and "\n" not in message and "refused" in message


def test_a_key_is_needed_and_checked():
    with ProbeStandin(visible=K, api_keys=("sesame",)) as server:
        with pytest.raises(ServerUnauthorized) as missing:
            run_probe(sweep(server))
        assert "--api-key" in str(missing.value) and "LAUNCH_API_KEY" in str(missing.value)
        with pytest.raises(ServerUnauthorized) as wrong:
            run_probe(sweep(server, api_key="open"))
        assert "rejected" in str(wrong.value)
        assert server.prompts == []  # nothing was sent before the key was checked
        result = run_probe(sweep(server, api_key="sesame", lengths=(500,), trials=1))
    assert result.overall_accuracy == 1.0


def test_without_a_tokenize_endpoint_lengths_are_flagged_as_estimates(tmp_path):
    notices = []
    with ProbeStandin(visible=K, encode=False) as server:
        result = run_probe(sweep(server, lengths=(800,), depths=(0.0,), trials=1),
                           progress=lambda e: notices.append(e.message) if e.kind == "notice" else None)
    assert not result.lengths_exact and result.token_counting.startswith("estimate")
    assert len(notices) == 1 and "estimates" in notices[0]
    assert "lengths are estimates" in format_table(result)
    data = json.loads(write_outputs(result, tmp_path).results_json.read_text())
    assert data["token_counting"]["exact"] is False and data["token_counting"]["note"]
    assert result.trials[0].correct  # still runs


def word_tokenizer(directory) -> None:
    """A real tokenizer.json (tokenizers library) that splits text the way the stand-in model does."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    words.save(str(directory / "tokenizer.json"))


def test_a_local_tokenizer_measures_when_the_server_cannot(tmp_path):
    word_tokenizer(tmp_path / "tok")
    with ProbeStandin(visible=K, encode=False) as server:
        result = run_probe(sweep(server, lengths=(700,), depths=(0.5,), trials=1, tokenizer=str(tmp_path / "tok")))
        prompt = server.prompts[0]
    assert result.lengths_exact and result.token_counting == f"tokenizer: {tmp_path / 'tok'}"
    assert result.trials[0].measured_tokens == len(tokenize(prompt)) <= 700


def test_the_server_tokenizer_wins_over_a_local_one(tmp_path):
    word_tokenizer(tmp_path / "tok")
    with ProbeStandin(visible=K) as server:
        result = run_probe(sweep(server, lengths=(700,), depths=(0.5,), trials=1, tokenizer=str(tmp_path / "tok")))
    assert result.token_counting == "server: POST /v1/encode"


def test_a_broken_tokenizer_is_one_clear_error(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    with ProbeStandin(visible=K, encode=False) as server:
        with pytest.raises(ProbeTokenizerFailed) as info:
            run_probe(sweep(server, tokenizer=str(tmp_path / "tok")))
        assert server.prompts == []
    assert str(tmp_path / "tok") in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_an_unknown_model_and_a_too_short_length_stop_before_the_sweep():
    with ProbeStandin(visible=K) as server:
        with pytest.raises(ProbeUnknownModel) as unknown:
            run_probe(sweep(server, model="gpt-99"))
        assert "standin-7b-chat" in str(unknown.value)
        with pytest.raises(ProbeLengthTooShort) as short:
            run_probe(sweep(server, lengths=(20, 500)))
        assert short.value.length == 20
        assert server.prompts == []


def test_ctrl_c_keeps_the_trials_so_far(tmp_path):
    def progress(event):
        if event.kind == "start" and event.done == 4:
            raise KeyboardInterrupt

    with ProbeStandin(visible=K) as server:
        result = run_probe(sweep(server), progress=progress)
    assert result.interrupted and not result.complete and len(result.trials) == 4
    assert result.cell(500, 0.5).trials == 1 and result.cell(2000, 1.0).accuracy is None
    table = format_table(result)
    assert "interrupted: 4 of 27" in table and table_cells(table)[(2000, 1.0)] == "-"
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths.results_json.read_text())
    assert data["interrupted"] is True and data["complete"] is False and len(data["trials"]) == 4
    assert png_size(paths.heatmap_png) == HEATMAP_SIZE_PX


def test_a_server_that_dies_mid_sweep_ends_it_with_partial_results():
    with ProbeStandin(visible=K, drop_after=4) as server:
        result = run_probe(sweep(server))
    assert isinstance(result.stopped_by, Unreachable)
    assert len(result.trials) == 5 and result.trials[-1].error and not result.complete
    assert "stopped early" in format_table(result)


def test_a_slow_answer_times_out_and_only_spoils_its_trial():
    with ProbeStandin(visible=K, chat_delay=1.5) as server:
        result = run_probe(sweep(server, lengths=(500,), depths=(0.0,), trials=2, timeout=0.3))
    assert result.complete and len(result.trials) == 2
    assert all("did not answer within 0.3 s" in t.error for t in result.trials)


def test_prompt_builder_matches_what_the_server_receives():
    """The recorded passkey and filler size reproduce the exact prompt that was sent."""
    with ProbeStandin(visible=K) as server:
        result = run_probe(sweep(server, lengths=(900,), depths=(0.25,), trials=2, seed=5))
        sent = list(server.prompts)
    assert len(result.trials) == len(sent) == 2  # zip alone would pass having compared nothing
    for trial, text in zip(result.trials, sent, strict=True):
        assert build_prompt(Filler(5, trial.trial), trial.passkey, 0.25, trial.filler_words).text == text
