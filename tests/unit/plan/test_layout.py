"""Scale-out layouts (launcher/plan/layout.py): replicas on one machine and one engine across nodes,
checked with the installed lmdeploy's own parallel-config function, and every command parsed by
lmdeploy's own `lmdeploy serve` parser."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from launcher.engine.parallel import LayoutRefused, check_parallel, lmdeploy_derive_parallel_config
from launcher.engine.spec import EngineConfig, EngineSpec
from launcher.plan.build import PlanRequest, build_plan
from launcher.plan.layout import (
    LayoutNeedsMoreGpus,
    node_layout,
    nodes_for_plan,
    nodes_json,
    render_nodes,
    render_replicas,
    replica_layout,
    replicas_for_plan,
    replicas_json,
    visible_devices,
)
from launcher.plan.request import parse_dist_init_addr
from launcher.rules.capacity import Capacity
from launcher.rules.checks import BadOption
from launcher.rules.configcheck import BadConfig
from launcher.rules.kvcache import LayoutHeadsIndivisible, tp_split
from tests.conftest import LLAMA


def lmdeploy_serve_parser() -> argparse.ArgumentParser:
    """lmdeploy's own `lmdeploy serve` sub-commands (api_server, proxy), built on a fresh parser so
    that lmdeploy's module-level parser (which other tests fill) is left as it was."""
    from lmdeploy.cli.serve import SubCliServe

    parser = argparse.ArgumentParser(prog="lmdeploy serve")
    saved = SubCliServe.subparsers
    SubCliServe.subparsers = parser.add_subparsers()
    try:
        SubCliServe.add_parsers()
    finally:
        SubCliServe.subparsers = saved
    return parser


@pytest.fixture(scope="module")
def serve_parser():
    return lmdeploy_serve_parser()


def parse(parser, argv) -> argparse.Namespace:
    assert list(argv[:2]) == ["lmdeploy", "serve"]
    return parser.parse_args(list(argv[2:]))


def engine(tp: int, backend: str = "turbomind", max_batch_size: int = 8, port: int = 9000) -> EngineSpec:
    return EngineSpec(backend=backend, config=EngineConfig(tp=tp, session_len=4096, max_batch_size=max_batch_size,
                                                           cache_max_entry_count=0.8, quant_policy=0),
                      model_name="tiny", trust_remote_code=False, port=port)


# --- done when -----------------------------------------------------------------------------------


def test_done_when_four_replicas_on_disjoint_gpu_pairs_at_131072(serve_parser):
    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat", factor="4", tp=2, gpu_memory_gib=80))
    layout = replicas_for_plan(plan, 4, environ={})
    assert layout.devices_assumed  # no GPU here: ids 0..7 assumed, and said so
    assert [r.devices for r in layout.replicas] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert [r.port for r in layout.replicas] == [23334, 23335, 23336, 23337]  # after the proxy's 23333
    for replica in layout.replicas:
        args = parse(serve_parser, replica.argv)
        assert args.session_len == 131072 and args.tp == 2 and args.backend == "turbomind"
        assert (args.server_name, args.server_port) == ("127.0.0.1", replica.port)
        assert replica.env == {"CUDA_VISIBLE_DEVICES": ",".join(replica.devices)}
    assert plan.memory.sessions >= 1
    assert layout.total_sessions == 4 * plan.memory.sessions
    data = json.loads(json.dumps(replicas_json(layout)))
    assert [d["cuda_visible_devices"] for d in data] == ["0,1", "2,3", "4,5", "6,7"]
    assert all(parse(serve_parser, d["command"]).session_len == 131072 for d in data)
    text = render_replicas(layout)
    assert "CUDA_VISIBLE_DEVICES=6,7 lmdeploy serve api_server" in text
    assert f"{layout.total_sessions} full-length session(s)" in text


def test_done_when_tp16_over_two_nodes_gives_two_commands_lmdeploy_parses(serve_parser):
    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat", factor="4", tp=16, gpu_memory_gib=80))
    layout = nodes_for_plan(plan, 2, "10.0.0.1:29500")
    assert (layout.nnodes, layout.gpus_per_node, layout.tp) == (2, 8, 16)
    assert layout.kv_heads_per_gpu == 1  # 8 KV heads repeated up to 16: one per GPU
    assert [n.serves_http for n in layout.nodes] == [True, False]
    for rank, node in enumerate(layout.nodes):
        args = parse(serve_parser, node.argv)
        assert (args.tp, args.nnodes, args.node_rank, args.dist_init_addr) == (16, 2, rank, "10.0.0.1:29500")
        assert args.session_len == 131072
    assert layout.total_sessions == plan.memory.sessions  # one engine: the KV plan per GPU with tp 16
    data = nodes_json(layout)
    assert [(d["rank"], d["port"], len(d["gpus"])) for d in data] == [(0, 23333, 8), (1, None, 8)]
    assert "--node-rank 1 --dist-init-addr 10.0.0.1:29500" in render_nodes(layout)


# --- lmdeploy's own check --------------------------------------------------------------------------


def test_the_check_is_lmdeploys_own_function():
    from lmdeploy.turbomind import parallel_config  # the package import (torch); the layout avoids it

    ours = lmdeploy_derive_parallel_config()
    assert ours.__code__.co_filename == parallel_config.derive_parallel_config.__code__.co_filename
    for args in [(1, 8, 1, 1, None, 8), (1, 16, 1, 1, None, 16), (1, 2, 1, 1, None, 2)]:
        assert vars(ours(*args)) == vars(parallel_config.derive_parallel_config(*args))


@pytest.mark.parametrize("tp, nnodes, per_node", [(8, 1, 4), (16, 2, 4), (8, 2, 2)])
def test_layouts_lmdeploy_refuses_are_refused(tp, nnodes, per_node):
    with pytest.raises(LayoutRefused) as err:
        check_parallel(tp, nnodes=nnodes, gpus_per_node=per_node)
    assert "no valid parallel config" in str(err.value)  # lmdeploy's own reason, passed on


@pytest.mark.parametrize("tp, nnodes, per_node", [(2, 1, 2), (8, 1, 8), (16, 2, 8), (32, 4, 8), (4, 1, 8)])
def test_layouts_lmdeploy_accepts(tp, nnodes, per_node):
    check = check_parallel(tp, nnodes=nnodes, gpus_per_node=per_node)
    assert check.device_num == tp and check.gpus_per_node == tp // nnodes


def test_tp_that_does_not_split_over_the_nodes_is_refused():
    with pytest.raises(LayoutRefused, match="equal node shares"):
        check_parallel(6, nnodes=4)


# --- head counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads, tp, per_gpu", [(8, 2, 4), (8, 16, 1), (2, 4, 1), (6, 4, 2), (32, 32, 1)])
def test_kv_heads_are_repeated_up_to_tp(kv_heads, tp, per_gpu):
    section = {"num_attention_heads": 32, "hidden_size": 4096, "num_key_value_heads": kv_heads}
    assert tp_split(section, tp) == per_gpu


def test_heads_that_tp_does_not_divide_are_refused():
    with pytest.raises(LayoutHeadsIndivisible, match="32 attention heads"):
        tp_split({"num_attention_heads": 32, "hidden_size": 4096}, 3)
    with pytest.raises(LayoutHeadsIndivisible, match="hidden size"):
        tp_split({"num_attention_heads": 4, "hidden_size": 66}, 4)
    with pytest.raises(BadConfig, match="num_attention_heads"):
        tp_split({"num_attention_heads": "32", "hidden_size": 4096}, 2)


# --- replicas ----------------------------------------------------------------------------------------


def test_more_gpus_than_visible_is_refused_before_anything():
    devices = visible_devices(None, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"})
    with pytest.raises(LayoutNeedsMoreGpus) as err:
        replica_layout(engine(2), "/m", tp_split(LLAMA, 2), replicas=4, devices=devices)
    assert "needs 8 GPUs, but 6 are visible" in str(err.value)


def test_the_gpus_counted_are_the_first_entries_of_the_list_not_indices_below_the_count():
    """gpu.count counts the GPUs CUDA enumerates: 4,5 on an 8-GPU machine are two GPUs, 4 and 5 (a
    bound of 2 on the indices would have left none); past the count, CUDA stopped at that entry."""
    assert visible_devices(2, {"CUDA_VISIBLE_DEVICES": "4,5"}).ids == ("4", "5")
    stopped = visible_devices(2, {"CUDA_VISIBLE_DEVICES": "0,1,9"})
    assert stopped.ids == ("0", "1") and stopped.stopped_at == "9" and "9" in stopped.note()
    assert visible_devices(None, {"CUDA_VISIBLE_DEVICES": "6,GPU-ab,MIG-cd"}).ids == ("6", "GPU-ab", "MIG-cd")
    layout = replica_layout(engine(1), "/m", tp_split(LLAMA, 1), replicas=2,
                            devices=visible_devices(2, {"CUDA_VISIBLE_DEVICES": "4,5"}))
    assert [r.devices for r in layout.replicas] == [("4",), ("5",)]


def test_replicas_of_one_port_each_need_only_the_next_port():
    """Kubernetes: a pod each, all on --port + 1; on one machine, one port each."""
    spec = engine(1, port=65534)
    pods = replica_layout(spec, "/m", tp_split(LLAMA, 1), replicas=3, devices=None, one_port=True)
    assert {r.port for r in pods.replicas} == {65535}
    with pytest.raises(BadOption) as err:
        replica_layout(spec, "/m", tp_split(LLAMA, 1), replicas=3, devices=None)
    assert "65535 to 65537" in str(err.value) and "--port 65532" in str(err.value)
    with pytest.raises(BadOption) as err:
        replica_layout(engine(1, port=65535), "/m", tp_split(LLAMA, 1), replicas=3, devices=None,
                       one_port=True)
    assert "on the port after it (65536)" in str(err.value) and "--port 65534" in str(err.value)


def test_replicas_take_the_visible_gpus_in_order(serve_parser):
    devices = visible_devices(8, {"CUDA_VISIBLE_DEVICES": "3,5,GPU-aa,7"})
    layout = replica_layout(engine(2), "/m", tp_split(LLAMA, 2), replicas=2, devices=devices)
    assert [r.devices for r in layout.replicas] == [("3", "5"), ("GPU-aa", "7")]
    assert not layout.devices_assumed and layout.total_sessions is None
    assert visible_devices(3, {}).ids == ("0", "1", "2") and visible_devices(None, {}).ids is None
    flat = [d for r in layout.replicas for d in r.devices]
    assert len(flat) == len(set(flat))
    assert [parse(serve_parser, r.argv).server_port for r in layout.replicas] == [9001, 9002]


def test_replica_ports_must_fit():
    """The replicas listen on the ports after the proxy's (the engine's): 65533 leaves room for 2."""
    with pytest.raises(BadOption, match="65535") as err:
        replica_layout(engine(1, port=65533), "/m", 1, replicas=3, devices=None)
    assert err.value.option == "--port" and "give --port 65532 or lower" in str(err.value)
    fits = replica_layout(engine(1, port=65533), "/m", 1, replicas=2, devices=None)
    assert [r.port for r in fits.replicas] == [65534, 65535]


def test_pytorch_replicas_skip_turbomind_check_but_not_the_heads(model_dir):
    """The heads are the plan's to check, for either engine (``tp_split`` in ``build_plan``): a
    pytorch plan with a tp that does not divide them stops there, before any layout."""
    layout = replica_layout(engine(4, "pytorch"), "/m", tp_split(LLAMA, 4), replicas=1, devices=None)
    assert layout.kv_heads_per_gpu == 1
    assert build_plan(PlanRequest(model=str(model_dir), factor=2, backend="pytorch", tp=4)).kv_heads_per_gpu == 1
    with pytest.raises(LayoutHeadsIndivisible, match="--tp '3'"):
        build_plan(PlanRequest(model=str(model_dir), factor=2, backend="pytorch", tp=3))
    with pytest.raises(BadOption, match="Ray"):
        node_layout(engine(4, "pytorch"), "/m", 1, nnodes=2, dist_init_addr="10.0.0.1:29500")


# --- nodes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["10.0.0.1", "10.0.0.1:", ":29500", "10.0.0.1:99999", "[::1]:29500",
                                   "0.0.0.0:29500", "host:port", "10.0.0.1:²", "10.0.0.1:0"])
def test_bad_dist_init_addr_is_refused(value):
    with pytest.raises(BadOption) as err:
        parse_dist_init_addr(value)
    assert err.value.option == "--dist-init-addr"


def test_one_node_is_not_a_multi_node_layout():
    with pytest.raises(BadOption, match="2 or more"):
        node_layout(engine(2), "/m", 1, nnodes=1, dist_init_addr="h:1")


def test_layouts_import_neither_lmdeploy_nor_torch():
    code = (
        "import sys, json\n"
        "from launcher.plan.build import PlanRequest, build_plan\n"
        "from launcher.plan.layout import replicas_for_plan, nodes_for_plan\n"
        "plan = build_plan(PlanRequest(model='internlm2_5-7b-chat', factor='2', tp=2, gpu_memory_gib=80))\n"
        "replicas_for_plan(plan, 2, environ={})\n"
        "nodes_for_plan(plan, 2, '10.0.0.1:29500')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('lmdeploy', 'torch'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# --- capacity: memory, capped at max_batch_size ---------------------------------------------------


@pytest.mark.parametrize("by_memory, batch, engines, per, total, limit", [
    (7, 64, 4, 7, 28, "memory"),  # the KV cache binds
    (150, 64, 2, 64, 128, "max_batch_size"),  # lmdeploy runs at most 64 sequences at once per engine
    (64, 64, 1, 64, 64, "memory"),  # a tie: both allow 64
    (0, 64, 3, 0, 0, "memory"),  # not one session fits
    (None, 64, 2, None, None, None),  # memory unknown: no number claimed
])
def test_capacity_is_memory_capped_at_max_batch_size(by_memory, batch, engines, per, total, limit):
    cap = Capacity(by_memory, batch, engines)
    assert (cap.per_engine, cap.total, cap.limit) == (per, total, limit)
    assert cap.json() == {"sessions": total, "sessions_per_engine": per, "limit": limit,
                          "sessions_by_memory": by_memory, "max_batch_size": batch}


def test_capacity_text_says_which_limit_binds():
    assert Capacity(150, 64, 2).text("replica") == (
        "128 full-length session(s) at once (64 per replica; limited by max_batch_size 64: the KV cache would "
        "hold 150 per replica; raise --max-batch-size to run more)")
    assert Capacity(7, 64).text() == ("7 full-length session(s) at once (limited by memory: the KV cache holds 7 "
                                      "per engine; max_batch_size 64 would allow more)")
    assert Capacity(None, 8, 3).text("replica").startswith("not known: the KV-cache fit is unknown; at most 24")
    assert Capacity(0, 64, 2).text("replica") == "none: not one full-length session fits in the KV cache of a replica"


@pytest.mark.parametrize("args", [(1, 0), (1, 8, 0), (-1, 8), (1.5, 8), (True, 8), (1, "8")])
def test_capacity_refuses_what_is_not_a_count(args):
    with pytest.raises(ValueError):
        Capacity(*args)


def test_layouts_cap_each_engine_at_its_max_batch_size():
    layout = replica_layout(engine(1, max_batch_size=4), "/m", 1, replicas=3, devices=None, sessions_per_replica=10)
    assert (layout.sessions_per_replica, layout.total_sessions, layout.capacity.limit) == (4, 12, "max_batch_size")
    assert [r["capacity_limit"] for r in replicas_json(layout)] == ["max_batch_size"] * 3
    assert "capacity       12 full-length session(s) at once (4 per replica; limited by max_batch_size 4" \
        in render_replicas(layout)
    nodes = node_layout(engine(2, max_batch_size=16), "/m", 1, nnodes=2, dist_init_addr="10.0.0.1:29500",
                        sessions=40)
    assert (nodes.total_sessions, nodes.capacity.limit) == (16, "max_batch_size")  # one engine: no x nnodes
    assert "capacity       16 full-length session(s) at once (limited by max_batch_size 16" in render_nodes(nodes)
