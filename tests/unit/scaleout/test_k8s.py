"""`launch k8s`'s objects (launcher/scaleout/k8s.py) and `serve_argv` (launcher/plan/request.py), pure: plans
made from presets' stored facts (no request, no file written), every object validated strictly against
Kubernetes' own schemas (kubernetes-validate, 1.31) and the LeaderWorkerSet against its CRD's schema (the
vendored tests/support/k8s/, made strict), every command parsed by launch's own CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import kubernetes_validate as kv
import pytest
import typer
import yaml

from launcher.cli import app
from launcher.model.source import ModelSource
from launcher.plan.build import build_plan
from launcher.plan.request import FLAGS, PlanRequest, check_request, serve_argv
from launcher.scaleout import k8s as kube
from launcher.scaleout import manifests as kobjects
from tests.conftest import LLAMA

K8S_VERSION = "1.31"
LWS_SCHEMA = Path(__file__).resolve().parents[2] / "support" / "k8s" / "lws-v1-openapiv3.json"
IMAGE = "registry.example.com/team/launch:0.1.0"
MODEL = "internlm2_5-7b-chat"  # native 32,768; 32 heads, 8 KV heads; TurboMind


def strictify(node):
    """The schema with ``additionalProperties: false`` wherever it lists ``properties`` and says nothing
    of other ones (an API server with fieldValidation=Strict; by default it prunes unknown fields)."""
    if isinstance(node, list):
        return [strictify(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "default", "example") else strictify(v)) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def lws_schema():
    schema = strictify(json.loads(LWS_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def pod_template(lws: dict, role: str) -> dict:
    """An LWS pod template as a core PodTemplate, which Kubernetes' own schema checks."""
    template = lws["spec"]["leaderWorkerTemplate"][role]
    name = f"{lws['metadata']['name']}-{role.lower()}"
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def as_config_map(meta: dict) -> dict:
    """A top-level ``metadata`` checked as ObjectMeta (the CRD's schema leaves it a bare object)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}


def validate(objects: list[dict], lws_schema) -> None:
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            lws_schema.validate(obj)
            kv.validate(as_config_map(obj["metadata"]), K8S_VERSION, strict=True)
            for role in ("leaderTemplate", "workerTemplate"):
                kv.validate(pod_template(obj, role), K8S_VERSION, strict=True)
        else:
            assert kv.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION


def make(model: str = MODEL, options: dict | None = None, **flags):
    """(plan, objects) as `launch k8s` makes them (less the CLI: its flags, printing, serve's refusals)."""
    flags.setdefault("gpu_memory_gib", "80")
    replicas, nnodes = int(flags.get("replicas", 1)), int(flags.get("nnodes", 1))
    scale = "replicas" if replicas > 1 else "nodes" if nnodes > 1 else None
    if replicas > 1 and not (options or {}).get("api_key_secret"):
        flags.setdefault("router", "lmdeploy")  # the default router's replicas need a key (a test of its own)
    opts = kube.check_options(kube.K8sOptions(image=IMAGE, **(options or {})), model, scale)
    plan = build_plan(kube.cluster_request(PlanRequest(model=model, **flags), opts))
    return plan, kobjects.manifests(plan, kube.layout_for_cluster(plan), opts)


def kinds(objects: list[dict]) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in objects]


def containers(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, container) of every pod template."""
    out = []
    for o in objects:
        if o["kind"] == "Deployment":
            out += [(o["metadata"]["name"], c) for c in o["spec"]["template"]["spec"]["containers"]]
        elif o["kind"] == "LeaderWorkerSet":
            for role in ("leaderTemplate", "workerTemplate"):
                out += [(role, c) for c in o["spec"]["leaderWorkerTemplate"][role]["spec"]["containers"]]
    return out


def argv(container: dict) -> list[str]:
    return container["command"] + container["args"]


def flag(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def pod_spec(obj: dict, role: str | None = None) -> dict:
    if role is None:
        return obj["spec"]["template"]["spec"]
    return obj["spec"]["leaderWorkerTemplate"][role]["spec"]


# --- the three layouts -------------------------------------------------------------------------


def test_one_engine_is_a_deployment_and_a_service_running_serve_on_the_pods_address(lws_schema):
    plan, objects = make(factor="2", tp="2", port="8080")
    validate(objects, lws_schema)
    assert kinds(objects) == [("Deployment", "internlm2-5-7b-chat"), ("Service", "internlm2-5-7b-chat")]
    deployment, service = objects
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = pod_spec(deployment)["containers"]
    args = argv(container)
    assert args[:3] == ["launch", "serve", MODEL]
    assert (flag(args, "--factor"), flag(args, "--tp"), flag(args, "--host"), flag(args, "--port")) == (
        "2", "2", "0.0.0.0", "8080")
    assert flag(args, "--health-timeout") == "1800"
    for absent in ("--replicas", "--nnodes", "--gpu-memory", "--proxy-url", "--api-key"):
        assert absent not in args
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 2}, "requests": {"nvidia.com/gpu": 2}}
    assert plan.engine.config.tp == 2
    # the Service reaches the pod by its labels, on the port
    selector = service["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    for obj in objects:
        assert obj["metadata"]["namespace"] == "default"
        assert obj["metadata"]["labels"] == {
            "app.kubernetes.io/name": "launch", "app.kubernetes.io/instance": "internlm2-5-7b-chat",
            "app.kubernetes.io/managed-by": "launch", "app.kubernetes.io/component": "engine"}


def test_probes_give_the_pod_its_health_timeout_to_start_then_watch_health():
    _, objects = make(options={"health_timeout_s": 905.0})
    ((_, container),) = containers(objects)
    startup, ready, live = container["startupProbe"], container["readinessProbe"], container["livenessProbe"]
    health = {"path": "/health", "port": "http"}
    assert startup == {"httpGet": health, "periodSeconds": 10, "failureThreshold": 91}  # ceil(905 / 10)
    assert ready["httpGet"] == health and ready["periodSeconds"] == 10
    assert live == {"httpGet": health, "periodSeconds": 30, "failureThreshold": 3}
    assert flag(argv(container), "--health-timeout") == "905"
    _, other = make(options={"health_timeout_s": 2.5})
    ((_, short),) = containers(other)
    assert short["startupProbe"]["failureThreshold"] == 1 and flag(argv(short), "--health-timeout") == "2.5"


@pytest.mark.parametrize("claim", [None, "hf-cache"])
def test_the_caches_and_shared_memory_are_volumes_with_the_variables_that_point_there(claim):
    _, objects = make(options={"cache_pvc": claim})
    spec = pod_spec(objects[0])
    volumes = {v["name"]: v for v in spec["volumes"]}
    ((_, container),) = containers(objects)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = env_of(container)
    hf_home, launch_cache = env["HF_HOME"]["value"], env["LAUNCH_CACHE_DIR"]["value"]
    assert (mounts[hf_home], mounts[launch_cache], mounts["/dev/shm"]) == ("hf-cache", "launch-cache", "dshm")
    assert hf_home.startswith("/cache/") and launch_cache.startswith("/cache/")
    expected = {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
    assert {k: v for k, v in volumes["hf-cache"].items() if k != "name"} == expected
    # launch's own cache (port claims, run files) is each pod's, even when the HF cache is a shared claim
    assert volumes["launch-cache"] == {"name": "launch-cache", "emptyDir": {}}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def test_replicas_are_a_router_and_one_deployment_of_engines_that_register_under_their_pod_ip(lws_schema):
    _, objects = make(factor="4", tp="2", replicas="3", port="8000", options={"namespace": "serving", "api_key_secret": "keys"})
    validate(objects, lws_schema)
    router_name = "internlm2-5-7b-chat-router"
    assert kinds(objects) == [("Deployment", router_name), ("Service", router_name),
                              ("Deployment", "internlm2-5-7b-chat")]
    router, router_service, replicas = objects
    assert router["spec"]["replicas"] == 1
    (router_container,) = pod_spec(router)["containers"]
    assert argv(router_container) == kube.router_command(8000, router="vllm") == [
        "launch", "proxy", "start", "--host", "0.0.0.0", "--port", "8000", "--router", "vllm"]
    assert "resources" not in router_container  # no GPU
    assert router_service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    assert router_service["spec"]["ports"][0]["port"] == 8000
    # no Service selects the replicas: clients go through the router's
    replica_labels = replicas["spec"]["template"]["metadata"]["labels"]
    assert not router_service["spec"]["selector"].items() <= replica_labels.items()
    assert replicas["spec"]["replicas"] == 3
    assert replicas["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (engine,) = pod_spec(replicas)["containers"]
    args = argv(engine)
    port = 8001  # where replica 0 of `launch serve --replicas` listens
    assert (flag(args, "--host"), flag(args, "--port"), flag(args, "--tp")) == ("0.0.0.0", str(port), "2")
    assert flag(args, "--proxy-url") == "http://internlm2-5-7b-chat-router.serving.svc:8000"
    assert flag(args, "--advertise-url") == f"http://$(POD_IP):{port}"
    assert "--replicas" not in args  # each pod is one engine
    assert env_of(engine)["POD_IP"] == {"name": "POD_IP",
                                        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert engine["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert engine["ports"][0]["containerPort"] == port
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_routing_asked_for_reaches_the_router_command():
    assert kube.router_command(9000, "random")[-2:] == ["--routing", "random"]
    assert "--routing" not in kube.router_command(9000)


def test_nodes_are_one_leader_worker_set_and_a_service_for_the_leader(lws_schema):
    plan, objects = make(factor="4", tp="16", nnodes="2", options={"name": "big", "namespace": "ml"})
    validate(objects, lws_schema)
    assert kinds(objects) == [("LeaderWorkerSet", "big"), ("Service", "big-leader")]
    lws, service = objects
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["spec"]["replicas"] == 1
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"  # the leader is ready only once the workers joined
    (leader,) = pod_spec(lws, "leaderTemplate")["containers"]
    (worker,) = pod_spec(lws, "workerTemplate")["containers"]
    lead, work = argv(leader), argv(worker)
    for args in (lead, work):
        assert (flag(args, "--tp"), flag(args, "--nnodes")) == ("16", "2")
        assert flag(args, "--dist-init-addr") == "$(LWS_LEADER_ADDRESS):29500"
    assert flag(lead, "--node-rank") == "0" and flag(lead, "--host") == "0.0.0.0"
    assert flag(work, "--node-rank") == "$(LWS_WORKER_INDEX)"
    assert "--host" not in work  # its HTTP stays inside
    for container in (leader, worker):
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}  # tp 16 over 2 pods
        # LWS's webhook sets these (only where a container does not declare them): declared here they
        # would never be the group's
        assert not {"LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX"} & set(env_of(container))
    assert "startupProbe" in leader and "readinessProbe" in leader
    assert "ports" not in worker and "readinessProbe" not in worker and "startupProbe" not in worker
    assert service["spec"]["selector"] == {"app.kubernetes.io/instance": "big",
                                           "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    leader_pod_labels = {**group["leaderTemplate"]["metadata"]["labels"],
                         "leaderworkerset.sigs.k8s.io/worker-index": "0"}  # LWS labels the leader so
    assert service["spec"]["selector"].items() <= leader_pod_labels.items()
    # the plan was made for the address LWS gives the leader: its headless Service is named after the set
    assert plan.request.dist_init_addr == "big-0.big.ml:29500" == kube.rendezvous(
        kube.K8sOptions(image=IMAGE, name="big", namespace="ml"))
    assert service["metadata"]["name"] != lws["metadata"]["name"]  # LWS's own headless Service has that name


def test_the_pods_run_the_plan_the_objects_were_made_from():
    """Every value the user gave reaches the pods' serve (and nothing of this machine: --gpu-memory)."""
    plan, objects = make(context="64k", tp="2", cp="2", quant_policy="8", max_batch_size="16",
                         cache_max_entry_count="0.55", model_name="chat", enable_prefix_caching=False,
                         trust_remote_code=False, force=True)
    ((_, container),) = containers(objects)
    args = argv(container)
    assert args[3:args.index("--host")] == [
        "--context", "65536", "--force", "--tp", "2", "--max-batch-size", "16",
        "--cache-max-entry-count", "0.55", "--quant-policy", "8", "--cp", "2", "--no-prefix-caching",
        "--model-name", "chat", "--no-trust-remote-code"]
    assert plan.engine.config.session_len == 65536


# --- names, images, secrets ------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "name"), [
    ("internlm2_5-7b-chat", "internlm2-5-7b-chat"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2-5-7b-instruct"),
    ("llama-3.1-8b-instruct", "llama-3-1-8b-instruct"), ("org/model/", "model"),
])
def test_the_default_name_is_the_models_lowercased_with_dots_and_underscores_as_dashes(model, name):
    assert kube.default_name(model) == name
    assert kube.check_name(None, model, None) == name


@pytest.mark.parametrize(("scale", "longest"), [(None, 63), ("replicas", 56), ("nodes", 50)])
def test_a_name_fits_with_everything_launch_appends_to_it(scale, longest):
    name = "a" * longest
    assert kube.check_name(name, MODEL, scale) == name
    with pytest.raises(kube.BadK8sName) as info:
        kube.check_name(name + "b", MODEL, scale)
    assert f"at most {longest} characters" in str(info.value) and info.value.exit_code == 2
    # the longest name launch derives from it is still a name (and a label value)
    derived = {None: [name], "replicas": [name + "-router"],
               "nodes": [name + "-leader", name + "-0-" + "x" * 10]}
    assert all(len(d) <= 63 for d in derived[scale])


@pytest.mark.parametrize("name", ["Chat", "chat_1", "1chat", "chat-", "-chat", "ch.at", "", "chät"])
def test_a_name_that_is_no_dns_1035_label_is_refused(name):
    with pytest.raises(kube.BadK8sName) as info:
        kube.check_name(name, MODEL, None)
    assert str(info.value).startswith(f"--name {name!r} is not a Kubernetes name")
    assert "\n" not in str(info.value)


def test_a_default_name_that_is_no_label_says_to_give_one():
    with pytest.raises(kube.BadK8sName) as info:
        kube.check_name(None, "Org/7b-model", None)  # "7b-model" starts with a digit
    assert "'7b-model'" in str(info.value) and "give --name NAME" in str(info.value)


@pytest.mark.parametrize(("option", "value", "ok"), [
    ("namespace", "team-1", True), ("namespace", "1team", True), ("namespace", "Team", False),
    ("namespace", "a.b", False), ("namespace", "x" * 64, False),
    ("cache_pvc", "hf.cache-1", True), ("cache_pvc", "HF", False), ("api_key_secret", "keys", True),
    ("api_key_secret", "keys/x", False), ("hf_token_secret", "hf_token", False),
    ("hf_token_secret", "x" * 254, False),
])
def test_namespace_claim_and_secret_names_follow_kubernetes(option, value, ok):
    options = kube.K8sOptions(image=IMAGE, **{option: value})
    if ok:
        assert getattr(kube.check_options(options, MODEL, None), option) == value
    else:
        with pytest.raises(kube.BadK8sName) as info:
            kube.check_options(options, MODEL, None)
        assert info.value.option == "--" + option.replace("_", "-")


@pytest.mark.parametrize("image", [
    "launch", "launch:0.1.0", "library/launch", "docker.io/library/launch:latest", "localhost:5000/launch",
    "registry.example.com:443/team/sub/launch:v1_2.3-rc", "Registry.Example.com/launch", "a__b/c-d.e---f:T",
    "[::1]:5000/launch", "launch@sha256:" + "0" * 64, "ghcr.io/o/launch:1@sha256:" + "ab" * 32,
    "x:" + "t" * 128,
])
def test_image_references_of_the_docker_grammar_are_taken(image):
    assert kube.check_image(image) == image


@pytest.mark.parametrize(("image", "problem"), [
    ("", "empty"), ("launch 1", "blank"), ("Launch:1", "lowercase"), ("team/Launch", "lowercase"),
    ("launch:-1", "tag"), ("launch:" + "t" * 129, "tag"), ("launch@sha256:abc", "digest"),
    ("launch@md5:" + "0" * 32, "digest"), ("launch@sha256:" + "A" * 64, "digest"),
    ("launch/", "repository path"),
    ("-launch", "repository path"), ("la..unch", "repository path"), ("launch:1:2", "repository path"),
    ("/launch", "repository path"), ("laûnch", "ASCII"), ("a/" + "b" * 260, "longer than 255"),
])
def test_an_image_that_is_no_reference_is_refused_saying_why(image, problem):
    with pytest.raises(kube.BadImage) as info:
        kube.check_image(image)
    message = str(info.value)
    assert problem in message and "\n" not in message and info.value.exit_code == 2


def test_no_image_is_refused():
    with pytest.raises(kube.NoImage) as info:
        kube.check_options(kube.K8sOptions(image=None), MODEL, None)
    assert "--image" in str(info.value) and info.value.exit_code == 2


def secret_refs(container: dict) -> dict[str, dict]:
    return {name: e["valueFrom"]["secretKeyRef"] for name, e in env_of(container).items()
            if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("flags", [{}, {"replicas": "2"}, {"nnodes": "2", "tp": "2"}])
def test_secrets_reach_every_launch_container_by_reference_only(flags, monkeypatch):
    for var, value in (("LAUNCH_API_KEYS", "sk-value-in-env"), ("HF_TOKEN", "hf_value_in_env"),
                       ("LAUNCH_API_KEY", "sk-client-value")):
        monkeypatch.setenv(var, value)
    _, objects = make(options={"api_key_secret": "launch-keys", "hf_token_secret": "hf"}, **flags)
    for where, container in containers(objects):
        refs = secret_refs(container)
        assert refs["LAUNCH_API_KEYS"] == {"name": "launch-keys", "key": "LAUNCH_API_KEYS"}, where
        if container["name"] == "router":
            assert "HF_TOKEN" not in refs  # the router downloads nothing
        else:
            assert refs["HF_TOKEN"] == {"name": "hf", "key": "HF_TOKEN"}, where
        assert "value" not in env_of(container)["LAUNCH_API_KEYS"]
    text = kobjects.to_yaml(objects)
    assert "value-in-env" not in text and "sk-client" not in text and "--api-key" not in text
    _, bare = make(**flags)
    assert all(not secret_refs(c) for _, c in containers(bare))


# --- what the validators catch (the checks above are real) ----------------------------------------


def _mutations():
    def misspell(path, old, new):
        def change(objects):
            node = objects
            for key in path:
                node = node[key]
            node[new] = node.pop(old)
        return change

    def set_value(path, key, value):
        def change(objects):
            node = objects
            for step in path:
                node = node[step]
            node[key] = value
        return change

    container = [0, "spec", "template", "spec", "containers", 0]
    lws_group = [0, "spec", "leaderWorkerTemplate"]
    return [
        ("one", misspell([0, "spec"], "replicas", "replica")),
        ("one", misspell(container, "command", "comand")),
        ("one", set_value(container + ["ports", 0], "containerPort", "8080")),
        ("one", set_value([1, "spec", "ports", 0], "port", "23333")),
        ("one", set_value(container + ["startupProbe"], "failureThreshold", 1.5)),
        ("replicas", misspell([2, "spec", "template", "spec", "containers", 0, "env", 0, "valueFrom"],
                              "fieldRef", "fieldref")),
        ("nodes", misspell([0, "spec"], "leaderWorkerTemplate", "leaderWorkerTemplates")),
        ("nodes", set_value(lws_group, "size", "2")),
        ("nodes", set_value(lws_group, "restartPolicy", "Always")),
        ("nodes", misspell(lws_group + ["workerTemplate", "spec", "containers", 0], "args", "argz")),
        ("nodes", set_value(lws_group + ["leaderTemplate", "spec", "containers", 0, "resources", "limits"],
                            "nvidia.com/gpu", "8 GPUs")),
        ("nodes", misspell([0, "metadata"], "namespace", "namespaces")),
    ]


LAYOUT_FLAGS = {"one": {}, "replicas": {"replicas": "2"}, "nodes": {"nnodes": "2", "tp": "2"}}


@pytest.mark.parametrize(("layout", "mutate"), _mutations())
def test_the_validators_reject_a_broken_manifest(layout, mutate, lws_schema):
    _, objects = make(**LAYOUT_FLAGS[layout])
    validate(objects, lws_schema)
    mutate(objects)
    with pytest.raises(jsonschema.ValidationError):  # kubernetes_validate.ValidationError is one too
        validate(objects, lws_schema)


# --- the plan's facts -------------------------------------------------------------------------


def test_a_repo_id_is_pinned_to_the_commit_its_config_was_planned_with():
    sha = "0123456789abcdef0123456789abcdef01234567"
    source = ModelSource(label="org/tiny-llama", name="tiny-llama", config=dict(LLAMA),
                         config_origin=f"org/tiny-llama@{sha[:12]} config.json", repo_id="org/tiny-llama",
                         revision=sha, complete=False)
    opts = kube.check_options(kube.K8sOptions(image=IMAGE), "org/tiny-llama", None)
    request = kube.cluster_request(PlanRequest(model="org/tiny-llama", factor="2", revision="main",
                                                       gpu_memory_gib="80"), opts)
    plan = build_plan(request, source)
    ((_, container),) = containers(kobjects.manifests(plan, None, opts))
    assert flag(argv(container), "--revision") == sha and argv(container).count("--revision") == 1
    assert kube.default_name("org/tiny-llama") == opts.name == "tiny-llama"
    _, preset_objects = make(revision="v2")  # a preset keeps what was asked (its own pin otherwise)
    assert flag(argv(containers(preset_objects)[0][1]), "--revision") == "v2"


def test_a_model_directory_of_this_machine_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    opts = kube.check_options(kube.K8sOptions(image=IMAGE, name="tiny"), str(tmp_path), None)
    request = PlanRequest(model=str(tmp_path), factor="2", gpu_memory_gib="80")
    plan = build_plan(kube.cluster_request(request, opts))
    with pytest.raises(kobjects.ModelNotInPod) as info:
        kobjects.manifests(plan, None, opts)
    assert str(tmp_path) in str(info.value) and info.value.exit_code == 2


def test_the_cluster_plan_forgets_this_machines_gpus_and_keeps_a_gpu_memory_given():
    opts = kube.check_options(kube.K8sOptions(image=IMAGE), MODEL, None)
    given = build_plan(kube.cluster_request(PlanRequest(model=MODEL, gpu_memory_gib="80"), opts))
    assert kube.cluster_plan(given).memory == given.memory is not None
    assert kube.cluster_plan(given).gpu_count is None
    lines = kube.cluster_warnings(given, opts)
    assert not any("--gpu-memory" in line for line in lines)
    assert any("--api-key-secret" in line for line in lines)
    seen_here = build_plan(kube.cluster_request(PlanRequest(model=MODEL), opts))
    seen_here = replace(seen_here, gpu_source="nvml", gpu_count=1)  # as on a machine with a GPU
    assert kube.cluster_plan(seen_here).memory is None and kube.cluster_plan(seen_here).gpu_count is None
    assert any("--gpu-memory" in line for line in kube.cluster_warnings(seen_here, opts))


def test_a_replica_layout_is_not_refused_for_this_machines_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU here; the cluster has its own
    _, objects = make(replicas="4", tp="4")
    assert kinds(objects)[2] == ("Deployment", "internlm2-5-7b-chat")
    assert objects[2]["spec"]["replicas"] == 4


# --- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["one", "replicas", "nodes"])
def test_the_yaml_reads_back_as_the_objects_and_each_file_is_named_for_its_object(layout):
    _, objects = make(**LAYOUT_FLAGS[layout])
    text = kobjects.to_yaml(objects)
    assert list(yaml.safe_load_all(text)) == objects
    assert text.startswith("---\n") and text.count("\n---\n") == len(objects) - 1
    assert "&id" not in text and "*id" not in text  # no anchors: each value where it stands
    names = kobjects.file_names(objects)
    assert names[0].startswith("01-") and len(set(names)) == len(objects)
    for (name, body), obj in zip(kobjects.file_texts(objects), objects):
        assert name == f"{names.index(name) + 1:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        assert yaml.safe_load(body) == obj


# --- serve_argv ---------------------------------------------------------------------------------


def parse_serve(args: list[str]) -> PlanRequest:
    """The checked request `launch serve ARGS` makes: parsed by launch's own CLI (click's make_context
    runs every flag's reader), the command not run."""
    command = typer.main.get_command(app).commands["serve"]
    params = command.make_context("serve", list(args)).params
    params["gpu_memory_gib"] = params.pop("gpu_memory")
    fields = {name for name in PlanRequest.__dataclass_fields__}
    return check_request(PlanRequest.from_flags(**{k: v for k, v in params.items() if k in fields}))


def test_serve_argv_of_the_defaults_is_empty():
    assert serve_argv(check_request(PlanRequest(model=MODEL))) == []


@pytest.mark.parametrize("values", [
    {"factor": "2.5", "rope_type": "yarn", "session_len": "40000", "force": True, "backend": "pytorch",
     "tp": "2", "max_batch_size": "8", "cache_max_entry_count": "0.123456789", "quant_policy": "8", "cp": "2",
     "enable_prefix_caching": False, "gpu_memory_gib": "79.5", "host": "10.0.0.5", "port": "8080",
     "model_name": "-odd name", "revision": "v1.0", "trust_remote_code": False, "replicas": "3",
     "routing": "random"},
    {"context": "1m", "nnodes": "4", "node_rank": "3", "dist_init_addr": "10.0.0.1:29500",
     "enable_prefix_caching": True, "trust_remote_code": True, "factor": None, "tp": "8"},
    {"factor": "4", "host": "::1", "port": "65535"},
])
def test_serve_argv_reproduces_the_request_through_serves_own_parser(values):
    if "routing" in values and "router" in FLAGS:  # where --routing is lmdeploy's proxy's: that router
        values = {**values, "router": "lmdeploy"}
    request = check_request(PlanRequest(model=MODEL, **values))
    args = serve_argv(request)
    assert parse_serve([MODEL, *args]) == request
    assert "--model-name=-odd name" in args or "model_name" not in values  # a value that looks like a flag
    left = serve_argv(request, leave_out=("host", "port"))
    assert "--host" not in left and "--port" not in left
    assert len(left) == len(args) - 2 * len({"host", "port"} & set(values))


def test_serve_argv_takes_only_a_checked_request():
    with pytest.raises(ValueError, match="checked"):
        serve_argv(PlanRequest(model=MODEL, tp="2"))


def test_the_default_routers_replicas_without_a_key_are_refused_and_with_one_join_it():
    with pytest.raises(kube.ReplicasNeedKey):
        make(replicas="2", router=None)
    _, objects = make(options={"api_key_secret": "keys"}, replicas="2")
    router = next(c for _, c in containers(objects) if c["name"] == "router")
    assert router["args"][:2] == ["proxy", "start"] and router["args"][-2:] == ["--router", "vllm"]
