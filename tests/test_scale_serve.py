"""Scale-out through the real CLI: `launch plan --replicas / --nnodes` (layouts checked with
lmdeploy's own function, commands parsed by lmdeploy's own parser), `launch serve --proxy-url`
(a replica that registers itself after its /health and leaves on stop) and `launch serve
--replicas 2` (the REAL lmdeploy proxy in front of two STAND-IN engines, tests/standin_engine_server.py:
the GPU engine cannot run here)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_one_line_error
from tests.test_layout import lmdeploy_serve_parser, parse


@pytest.fixture(scope="module")
def serve_parser():
    return lmdeploy_serve_parser()


# --- launch plan --replicas / --nnodes ----------------------------------------------------------


def test_done_when_plan_four_replicas_on_disjoint_gpu_pairs(launch, serve_parser):
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "4", "--tp", "2", "--replicas", "4",
                    "--gpu-memory", "80", "--json", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    replicas = data["replicas"]
    assert len(replicas) == 4
    gpu_sets = [tuple(r["gpus"]) for r in replicas]
    assert all(len(g) == 2 for g in gpu_sets)
    assert len({gpu for g in gpu_sets for gpu in g}) == 8  # disjoint pairs
    ports = [r["port"] for r in replicas]
    assert ports == [23334, 23335, 23336, 23337] and data["proxy"]["port"] == 23333
    for r in replicas:
        assert r["session_len"] == 131072
        args = parse(serve_parser, r["command"])
        assert (args.session_len, args.tp, args.server_name, args.server_port) == (131072, 2, "127.0.0.1", r["port"])
        assert r["env"] == {"CUDA_VISIBLE_DEVICES": ",".join(r["gpus"])}
    proxy_args = parse(serve_parser, data["proxy"]["command"])
    assert (proxy_args.server_name, proxy_args.server_port) == ("127.0.0.1", 23333)
    per = data["memory"]["sessions_that_fit"]
    assert per >= 1 and data["capacity"]["sessions"] == 4 * per == 4 * data["capacity"]["sessions_per_replica"]
    assert data["capacity"]["gpu_ids_assumed"] is True


def test_plan_replicas_take_the_visible_gpus_and_text_shows_the_layout(launch):
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "4", "--tp", "2", "--replicas", "2",
                    "--gpu-memory", "80", "--port", "9000", env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert result.returncode == 0, result.stderr
    assert "CUDA_VISIBLE_DEVICES=4,5 lmdeploy serve api_server" in result.stdout
    assert "CUDA_VISIBLE_DEVICES=6,7 lmdeploy serve api_server" in result.stdout
    assert "http://127.0.0.1:9001" in result.stdout and "http://127.0.0.1:9002" in result.stdout
    assert "lmdeploy serve proxy --server-name 127.0.0.1 --server-port 9000" in result.stdout
    assert "full-length session(s) at once" in result.stdout


def test_done_when_plan_tp16_over_two_nodes(launch, serve_parser):
    args = ("plan", "internlm2_5-7b-chat", "--factor", "4", "--tp", "16", "--nnodes", "2",
            "--dist-init-addr", "10.0.0.1:29500", "--gpu-memory", "80")
    result = launch(*args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    nodes = data["nodes"]
    assert [n["rank"] for n in nodes] == [0, 1] and [n["serves_http"] for n in nodes] == [True, False]
    for node in nodes:
        parsed = parse(serve_parser, node["command"])
        assert (parsed.tp, parsed.nnodes, parsed.node_rank, parsed.dist_init_addr) == (16, 2, node["rank"],
                                                                                     "10.0.0.1:29500")
        assert parsed.session_len == 131072 and len(node["gpus"]) == 8
    assert data["kv_cache"]["tp"] == 16  # the KV plan is per GPU with the total tp
    assert data["capacity"]["sessions"] == data["memory"]["sessions_that_fit"]
    # the overlay hash: what every node compares; the same settings give the same hash, others not
    again = json.loads(launch(*args, "--json", "--node-rank", "1").stdout)
    assert data["overlay_sha256"] == again["overlay_sha256"]
    assert data["overlay_sha256"].startswith("sha256:") and len(data["overlay_sha256"]) == 7 + 64
    other = json.loads(launch("plan", "internlm2_5-7b-chat", "--factor", "2", "--json").stdout)
    assert other["overlay_sha256"] != data["overlay_sha256"]
    text = launch(*args)
    assert f"overlay hash   {data['overlay_sha256']}" in text.stdout
    assert "--node-rank 1 --dist-init-addr 10.0.0.1:29500" in text.stdout


def test_plan_overlay_hash_is_the_hash_of_what_the_overlay_holds(model_dir):
    """The hash covers the bytes launch writes into the overlay (less the machine's source path)."""
    import hashlib

    from launcher.overlay import CONFIG, PROVENANCE
    from launcher.plan import PlanRequest, build_plan, make_overlay, overlay_digest

    plan = build_plan(PlanRequest(model=str(model_dir), factor="2"))
    overlay = make_overlay(plan)
    provenance = json.loads((overlay.path / PROVENANCE).read_text())
    provenance.pop("source")
    from launcher.overlay import config_bytes

    digest = hashlib.sha256()
    for part in ((overlay.path / CONFIG).read_bytes(), config_bytes(provenance)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    assert overlay_digest(plan) == "sha256:" + digest.hexdigest()


@pytest.mark.parametrize("flags, needles", [
    (["--replicas", "0"], ["--replicas", "from 1 to 256"]),
    (["--replicas", "two"], ["--replicas"]),
    (["--replicas", "2", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:29500"], ["--replicas", "--nnodes"]),
    (["--nnodes", "2"], ["--dist-init-addr", "rendezvous"]),
    (["--nnodes", "2", "--dist-init-addr", "0.0.0.0:29500"], ["--dist-init-addr", "real address"]),
    (["--nnodes", "2", "--dist-init-addr", "10.0.0.1"], ["--dist-init-addr", "HOST:PORT"]),
    (["--node-rank", "1"], ["--node-rank", "--nnodes"]),
    (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], ["--node-rank", "from 0 to 1"]),
    (["--tp", "2", "--replicas", "3"], ["--replicas 3 x --tp 2 needs 6 GPUs", "4 are visible"]),
    (["--tp", "3", "--replicas", "1", "--nnodes", "3", "--dist-init-addr", "h:1"], ["--tp", "32 attention heads"]),
    (["--tp", "8", "--nnodes", "3", "--dist-init-addr", "h:1"], ["--tp 8", "3 node"]),
    (["--port", "65535", "--replicas", "2"], ["--port", "replica ports"]),
])
def test_bad_scale_flags_are_one_line_errors(launch, flags, needles):
    result = launch("plan", "internlm2_5-7b-chat", "--factor", "2", "--gpu-memory", "80", *flags,
                    env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert_one_line_error(result, *needles)
