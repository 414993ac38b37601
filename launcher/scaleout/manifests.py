"""``launch k8s``'s Kubernetes objects, as plain dicts, and their YAML: what runs a plan the cluster
checked and planned in ``launcher.scaleout.k8s`` (its options, request, layout and the pods' commands).
Pure: no I/O.

Three layouts, as the request asks:

- one engine: a Deployment of one pod (``strategy: Recreate``: a second pod would need its GPUs
  while the first still holds them) and a ClusterIP Service on ``--port``;
- ``--replicas N``: the router (``router_command``) as a Deployment and a Service on ``--port``, and
  the replicas as one Deployment of N pods, each one engine on ``--port`` + 1 (where replica 0 of
  ``launch serve --replicas`` listens) that registers itself with the router under its pod IP. No
  Service for the replicas: clients use the router's;
- ``--nnodes N``: a LeaderWorkerSet (``leaderworkerset.x-k8s.io/v1``) of one group of N pods, rank 0
  (the leader) serving HTTP, and a Service for the leader. LWS's webhook puts ``LWS_LEADER_ADDRESS``
  and ``LWS_WORKER_INDEX`` into every container's ``env`` (``pkg/utils/pod/pod_utils.go``:
  ``AddLWSVariables``, first in the list and only where the container does not declare them), so
  the kubelet expands ``$(LWS_LEADER_ADDRESS)`` in the args; declaring them here would stop the
  webhook from setting them.

Every engine pod: ``tp`` GPUs (tp / N across nodes), the Hugging Face cache at ``HF_HOME`` (a
PersistentVolumeClaim with ``--cache-pvc``, else an emptyDir), launch's own cache at
``LAUNCH_CACHE_DIR`` on an emptyDir of its own (it holds a pod's port claims and run files, which
pods must not share, even on a shared claim), ``/dev/shm`` in memory, and probes on ``/health``.
Secrets are referenced by name only: no key or token value ever enters a manifest.
"""

from __future__ import annotations

import math

from launcher.errors import LaunchError
from launcher.plan.build import Plan
from launcher.plan.layout import NodeLayout, ReplicaLayout
from launcher.runtime.paths import CACHE_ENV
from launcher.scaleout.k8s import RENDEZVOUS_PORT, K8sOptions, router_command, serve_command
from launcher.scaleout.proxy import DEFAULT_START_TIMEOUT_S

CACHE_ROOT = "/cache"
HF_HOME_PATH = f"{CACHE_ROOT}/huggingface"
LAUNCH_CACHE_PATH = f"{CACHE_ROOT}/launch"
GPU_RESOURCE = "nvidia.com/gpu"
API_KEYS_ENV = "LAUNCH_API_KEYS"  # the secret's key and the variable launch reads
HF_TOKEN_ENV = "HF_TOKEN"
POD_IP_ENV = "POD_IP"
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
PROBE_PERIOD_S = 10  # startup and readiness
LIVENESS_PERIOD_S = 30
LIVENESS_FAILURES = 3
ROUTER_PROBE_PERIOD_S = 5


class ModelNotInPod(LaunchError):
    model: str
    exit_code = 2
    message = ("MODEL {model!r} is a directory on this machine, which a pod cannot read: give a preset "
               "(`launch presets`) or a Hub repo id, which the pods download")


# --- objects -----------------------------------------------------------------------------------


def labels(options: K8sOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "launch", "app.kubernetes.io/instance": options.name,
            "app.kubernetes.io/managed-by": "launch", "app.kubernetes.io/component": component}


def _selector(options: K8sOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": options.name, "app.kubernetes.io/component": component}


def _meta(name: str, options: K8sOptions, component: str) -> dict:
    return {"name": name, "namespace": options.namespace, "labels": labels(options, component)}


def _secret_env(variable: str, secret: str | None) -> list[dict]:
    if secret is None:
        return []
    return [{"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": variable}}}]


def _http_get(path: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s,
            "failureThreshold": failures}


def _tcp(period_s: int, failures: int) -> dict:
    return {"tcpSocket": {"port": "http"}, "periodSeconds": period_s, "failureThreshold": failures}


def _container(name: str, image: str, argv: list[str], port: int | None, env: list[dict],
               mounts: list[dict]) -> dict:
    """A container running ``argv``; ``port``: where it serves the pod's clients (None: no one)."""
    ports = {}
    if port is not None:
        ports = {"ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}
    return {"name": name, "image": image, "command": argv[:1], "args": argv[1:], **ports, "env": env,
            "volumeMounts": mounts}


def _engine_pod(plan: Plan, options: K8sOptions, argv: list[str], port: int | None, gpus: int, *,
                env: tuple[dict, ...] = ()) -> dict:
    """The pod spec of one engine process (a whole engine, or one node's share): its GPUs, caches,
    secrets by reference and, where it serves the pod's clients on ``port`` (None: no one), its
    port and probes on /health."""
    environment = [*env, {"name": "HF_HOME", "value": HF_HOME_PATH},
                   {"name": CACHE_ENV, "value": LAUNCH_CACHE_PATH},
                   *_secret_env(HF_TOKEN_ENV, options.hf_token_secret),
                   *_secret_env(API_KEYS_ENV, options.api_key_secret)]
    mounts = [{"name": "hf-cache", "mountPath": HF_HOME_PATH},
              {"name": "launch-cache", "mountPath": LAUNCH_CACHE_PATH},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    container = _container("engine", options.image, argv, port, environment, mounts)
    container["resources"] = {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}
    if port is not None:
        # serve waits --health-timeout for /health; the startup probe gives the pod as long, download included
        container["startupProbe"] = _http_get("/health", PROBE_PERIOD_S,
                                              max(1, math.ceil(options.health_timeout_s / PROBE_PERIOD_S)))
        container["readinessProbe"] = _http_get("/health", PROBE_PERIOD_S, 3)
        container["livenessProbe"] = _http_get("/health", LIVENESS_PERIOD_S, LIVENESS_FAILURES)
    hf_cache = ({"persistentVolumeClaim": {"claimName": options.cache_pvc}} if options.cache_pvc is not None
                else {"emptyDir": {}})
    volumes = [{"name": "hf-cache", **hf_cache}, {"name": "launch-cache", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return {"containers": [container], "volumes": volumes}


def _router_pod(options: K8sOptions, port: int, routing: str | None, router: str | None) -> dict:
    env = [{"name": CACHE_ENV, "value": LAUNCH_CACHE_PATH},
           *_secret_env(API_KEYS_ENV, options.api_key_secret)]
    container = _container("router", options.image, router_command(port, routing, router), port, env,
                           [{"name": "launch-cache", "mountPath": LAUNCH_CACHE_PATH}])
    # A TCP check: it holds for whichever router runs (lmdeploy's proxy has no /health).
    starting = math.ceil(DEFAULT_START_TIMEOUT_S / ROUTER_PROBE_PERIOD_S)
    container["startupProbe"] = _tcp(ROUTER_PROBE_PERIOD_S, starting)
    container["readinessProbe"] = _tcp(PROBE_PERIOD_S, 3)
    container["livenessProbe"] = _tcp(LIVENESS_PERIOD_S, LIVENESS_FAILURES)
    return {"containers": [container], "volumes": [{"name": "launch-cache", "emptyDir": {}}]}


def _deployment(name: str, options: K8sOptions, component: str, replicas: int, pod: dict,
                strategy: dict) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, options, component),
        "spec": {
            "replicas": replicas,
            "strategy": strategy,
            "selector": {"matchLabels": _selector(options, component)},
            "template": {"metadata": {"labels": labels(options, component)}, "spec": pod},
        },
    }


def _service(name: str, options: K8sOptions, component: str, selector: dict, port: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, options, component),
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
    }


RECREATE = {"type": "Recreate"}  # one engine's GPUs are let go before its successor asks for them
# replicas: one at a time, never one more than asked (a surge pod would wait for GPUs)
ROLLING_ONE_BY_ONE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}


def manifests(plan: Plan, layout: ReplicaLayout | NodeLayout | None, options: K8sOptions) -> list[dict]:
    """The objects that run ``plan`` (its ``layout``: ``k8s.layout_for_cluster``) under ``options``
    (checked: ``k8s.check_options``): see the module's docstring. ``ModelNotInPod`` for a model directory."""
    source = plan.source
    if source.repo_id is None and source.preset is None:
        raise ModelNotInPod(source.label)
    request, name = plan.request, options.name
    port, tp = request.port, plan.engine.config.tp
    if isinstance(layout, ReplicaLayout):
        router = f"{name}-router"
        replica_port = layout.replicas[0].port
        joining = ["--proxy-url", f"http://{router}.{options.namespace}.svc:{port}",
                   "--advertise-url", f"http://$({POD_IP_ENV}):{replica_port}"]
        pod_ip = {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        command = serve_command(plan, options, replica_port, *joining)
        engine = _engine_pod(plan, options, command, replica_port, tp, env=(pod_ip,))
        return [
            _deployment(router, options, "router", 1, _router_pod(options, port, request.routing, request.router),
                        RECREATE),
            _service(router, options, "router", _selector(options, "router"), port),
            _deployment(name, options, "replica", len(layout.replicas), engine, ROLLING_ONE_BY_ONE),
        ]
    if isinstance(layout, NodeLayout):
        return _leader_worker_set(plan, layout, options)
    pod = _engine_pod(plan, options, serve_command(plan, options, port), port, tp)
    return [_deployment(name, options, "engine", 1, pod, RECREATE),
            _service(name, options, "engine", _selector(options, "engine"), port)]


def _leader_worker_set(plan: Plan, layout: NodeLayout, options: K8sOptions) -> list[dict]:
    name, port, n = options.name, plan.request.port, layout.nnodes
    nodes = ["--nnodes", str(n), "--dist-init-addr", f"$(LWS_LEADER_ADDRESS):{RENDEZVOUS_PORT}"]
    leader = _engine_pod(plan, options, serve_command(plan, options, port, *nodes, "--node-rank", "0"), port,
                         layout.gpus_per_node)
    # The other ranks serve no client: their HTTP stays on the pod's loopback, where serve watches it.
    rank = ["--node-rank", "$(LWS_WORKER_INDEX)"]
    worker = _engine_pod(plan, options, serve_command(plan, options, port, *nodes, *rank, public=False), None,
                         layout.gpus_per_node)
    lws = {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": _meta(name, options, "engine"),
        "spec": {
            "replicas": 1,
            # Workers start with the leader: the leader's /health answers only once every rank has joined.
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": n,
                "restartPolicy": "RecreateGroupOnPodRestart",  # one engine: a rank lost is the engine lost
                "leaderTemplate": {"metadata": {"labels": labels(options, "leader")}, "spec": leader},
                "workerTemplate": {"metadata": {"labels": labels(options, "worker")}, "spec": worker},
            },
        },
    }
    selector = {"app.kubernetes.io/instance": name, LWS_WORKER_INDEX_LABEL: "0"}
    return [lws, _service(f"{name}-leader", options, "leader", selector, port)]


# --- text --------------------------------------------------------------------------------------


def to_yaml(objects: list[dict]) -> str:
    """The objects as one multi-document YAML stream, each document started by ``---``."""
    import yaml

    class Plain(yaml.SafeDumper):  # every value written out where it stands: no &anchor / *alias
        def ignore_aliases(self, data: object) -> bool:
            return True

    return yaml.dump_all(objects, Dumper=Plain, sort_keys=False, explicit_start=True, allow_unicode=True,
                         width=4096)


def file_names(objects: list[dict]) -> list[str]:
    """``NN-kind-name.yaml`` for each object, numbered in order from 01 (``kubectl apply -f DIR``
    applies them in that order)."""
    return [f"{i:02d}-{o['kind'].lower()}-{o['metadata']['name']}.yaml" for i, o in enumerate(objects, 1)]


def file_texts(objects: list[dict]) -> list[tuple[str, str]]:
    """(file name, YAML) for each object: what ``--out`` writes."""
    return list(zip(file_names(objects), (to_yaml([o]) for o in objects)))


__all__ = ["ModelNotInPod", "file_names", "file_texts", "manifests", "to_yaml"]
