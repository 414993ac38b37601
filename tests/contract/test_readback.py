"""The serving process's last check (launcher.engine.readback), with the installed lmdeploy's own loader on real
overlays: a class of the checkpoint's code that refuses the overlay, or a RoPE setting changed after
launch wrote it, stops ``launcher.engine.server`` with one line before any weight is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.engine import server as engine_server
from launcher.engine.readback import readback_problem
from tests.conftest import LLAMA
from tests.integration.test_readers import internlm2_checkpoint

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

pytest.importorskip("lmdeploy")


def patched(launch, src: Path, out: Path, *args: str) -> Path:
    result = launch("patch", str(src), *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def rewrite(overlay: Path, change) -> None:
    """Replace the overlay's config.json (a real file launch wrote) with a changed copy."""
    config = json.loads((overlay / "config.json").read_text())
    change(config)
    (overlay / "config.json").write_text(json.dumps(config))


def test_an_overlay_launch_wrote_is_read_as_planned(launch, tmp_path):
    overlay = patched(launch, internlm2_checkpoint(tmp_path), tmp_path / "o1", "--factor", "2", "--trust-remote-code")
    assert readback_problem(overlay, trust_remote_code=True) is None
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(LLAMA))
    assert readback_problem(patched(launch, llama, tmp_path / "o2", "--factor", "3", "--type", "yarn"), False) is None


def test_a_class_of_the_checkpoint_that_refuses_the_overlay_stops_the_server(launch, tmp_path):
    overlay = patched(launch, internlm2_checkpoint(tmp_path), tmp_path / "o", "--factor", "2", "--trust-remote-code")
    rewrite(overlay, lambda c: c["rope_scaling"].update(rope_type="dynamic"))  # what launch wrote before
    problem = readback_problem(overlay, trust_remote_code=True)
    assert "InternLM2Config refuses" in problem and "generic fallback" in problem and "\n" not in problem
    # without trust_remote_code the class is never run: the plan warned, the fallback is expected
    assert readback_problem(overlay, trust_remote_code=False) is None


def test_a_factor_changed_after_launch_wrote_it_stops_the_server(launch, tmp_path, capsys):
    overlay = patched(launch, internlm2_checkpoint(tmp_path), tmp_path / "o", "--factor", "2", "--trust-remote-code")
    rewrite(overlay, lambda c: c["rope_scaling"].update(factor=3.0))
    problem = readback_problem(overlay, trust_remote_code=True)
    assert problem.startswith("lmdeploy reads dynamic x3 from the overlay, not the planned dynamic x2")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model_path": str(overlay), "backend": "pytorch", "trust_remote_code": True,
                                "engine_config": {"session_len": 65536, "tp": 1}, "model_name": "m",
                                "chat_template": None, "server_name": "127.0.0.1", "server_port": 1,
                                "api_keys": []}))
    os.chmod(spec, 0o600)
    assert engine_server.main([str(spec)]) == engine_server.EXIT_OVERLAY_MISREAD
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not the planned dynamic x2" in err
