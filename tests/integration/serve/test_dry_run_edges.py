"""`serve --dry-run` exits as `serve` would (issue 17): too few GPUs for the tp as CUDA sees them here
(``CUDA_VISIBLE_DEVICES`` counts when NVML cannot: --gpu-memory given, or no driver), and a port in use;
`launch k8s` plans for the cluster's GPUs, not this machine's, and its replica pods share one port."""

from __future__ import annotations

import os
import socket

import pytest
import yaml

from tests.conftest import assert_one_line_error

pytestmark = pytest.mark.slow  # launch's CLI in subprocesses, sockets

MODEL = "internlm2_5-7b-chat"
IMAGE = "registry.example.com/team/launch:0.1.0"


def env_with(devices: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


@pytest.mark.parametrize(("devices", "seen"), [("0,1", 2), ("", 0), ("3,GPU-aa11,-1,4", 2), ("7", 1)])
def test_a_tp_past_the_gpus_cuda_sees_is_refused_by_the_dry_run_as_serve_refuses_it(launch, devices, seen):
    flags = (MODEL, "--tp", "4", "--gpu-memory", "80")
    dry = launch("serve", *flags, "--dry-run", env=env_with(devices))
    assert dry.returncode == 2, dry.stderr
    assert dry.stderr.strip().splitlines()[-1] == (f"launch: error: --tp '4': needs 4 GPUs; this machine has {seen} as "
                                                    "CUDA sees them; give a tp that fits")
    assert "serve would refuse this" in dry.stdout
    planned = launch("plan", *flags, env=env_with(devices))
    assert planned.returncode == 0 and f"--tp 4 needs 4 GPUs; this machine has {seen} as CUDA sees them: serve will stop" in planned.stdout
    fits = launch("serve", MODEL, "--tp", str(max(seen, 1)), "--gpu-memory", "80", "--dry-run", "--json",
                  env=env_with(devices))
    assert (fits.returncode == 0) == (seen > 0), fits.stderr
    unset = launch("serve", *flags, "--dry-run", env=env_with(None))  # no GPU, no list: nothing to count
    assert unset.returncode == 0, unset.stderr


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_port_in_use_is_refused_by_the_dry_run_as_serve_refuses_it(launch, replicas):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = port if replicas == 1 else port - 1  # the proxy's port, or replica 0's just after it
        scale = ("--replicas", "2", "--router", "lmdeploy") if replicas == 2 else ()
        dry = launch("serve", MODEL, "--gpu-memory", "80", "--port", str(busy), *scale, "--dry-run",
                     env=env_with("0,1"))
        assert dry.returncode == 1, dry.stderr  # serve's PortInUse: this machine's state, not bad input
        assert f"port {port}" in dry.stderr.strip().splitlines()[-1] and "in use" in dry.stderr
    free = launch("serve", MODEL, "--gpu-memory", "80", "--port", str(busy), *scale, "--dry-run", env=env_with("0,1"))
    assert free.returncode == 0, free.stderr


def test_k8s_plans_for_the_clusters_gpus_and_its_replica_pods_share_the_next_port(launch):
    made = launch("k8s", MODEL, "--image", IMAGE, "--tp", "2", "--gpu-memory", "80", env=env_with("0"))
    assert made.returncode == 0, made.stderr
    assert "as CUDA sees them" not in made.stderr  # this machine's one GPU says nothing about the pods'
    pods = launch("k8s", MODEL, "--image", IMAGE, "--gpu-memory", "80", "--replicas", "3", "--port", "65534",
                  "--router", "lmdeploy", env=env_with(None))
    assert pods.returncode == 0, pods.stderr
    ports = {p["containerPort"] for o in yaml.safe_load_all(pods.stdout) if o["kind"] == "Deployment"
             for c in o["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert ports == {65534, 65535}
    past = launch("k8s", MODEL, "--image", IMAGE, "--gpu-memory", "80", "--replicas", "3", "--port", "65535",
                  "--router", "lmdeploy", env=env_with(None))
    assert_one_line_error(past, "--port '65535'", "(65536)", "--port 65534", code=2)
