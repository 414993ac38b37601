"""``launch k8s``: what runs in the cluster, checked and planned. Pure: no I/O (but for lmdeploy's
own parallel rule, read from its file as ``launch plan`` reads it).

The plan is ``launch plan``'s (``build_plan`` on the one request, checked once): the manifests
(``launcher.scaleout.manifests``, which writes the objects) run exactly that, each pod running
``launch serve`` with the flags that reproduce the request (``request.serve_argv``), so launch plans,
checks and serves inside the pod as it does on a machine. Here: the options ``launch k8s`` adds
(image, names, secrets: ``check_options``), the request and plan as the pods serve them
(``cluster_request``, ``cluster_plan``, ``layout_for_cluster``, ``cluster_warnings``), and the
commands the router's and the engines' containers run (``router_command``, ``serve_command``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from launcher.errors import LaunchError
from launcher.plan.build import Plan, gpu_shortage
from launcher.plan.layout import NodeLayout, ReplicaLayout, nodes_for_plan, replicas_for_plan
from launcher.plan.request import FLAGS, PlanRequest, check_request, serve_argv
from launcher.runtime.paths import is_commit_sha
from launcher.runtime.supervise import DEFAULT_HEALTH_TIMEOUT_S

DEFAULT_NAMESPACE = "default"
LAUNCH = "launch"  # the program every container runs (the image must have it on PATH)
POD_HOST = "0.0.0.0"  # inside a pod: the pod's own address, which the Service and the probes reach
RENDEZVOUS_PORT = 29500  # the leader's TurboMind rendezvous (--dist-init-addr), pod to pod

# What launch appends to --name, per layout (the longest counts against the 63 characters of a name):
# the router's Deployment and Service; the leader's Service, and LWS's worker StatefulSet NAME-0, whose
# pods carry the label controller-revision-hash=NAME-0-HASH (HASH up to 10 characters; a label value
# holds at most 63).
NAME_SUFFIXES = {None: ("",), "replicas": ("-router",), "nodes": ("-leader", "-0-" + "h" * 10)}
NAME_MAX = 63


class NoImage(LaunchError):
    exit_code = 2
    message = ("give the container image the pods run, one with launch installed (`launch` on its PATH), "
               "e.g. --image registry.example.com/launch:0.1.0")


class BadImage(LaunchError):
    image: str
    problem: str
    exit_code = 2
    message = ("--image {image!r} is not an image reference ({problem}): "
               "[REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST], e.g. registry.example.com/launch:0.1.0")


class BadK8sName(LaunchError):
    option: str
    value: str
    rule: str
    exit_code = 2
    message = "{option} {value!r} is not a Kubernetes name here: it must be {rule}"


class ReplicasNeedKey(LaunchError):
    """``--replicas`` with the default router and no key: the replicas could not join it."""

    exit_code = 2
    message = (
        "--replicas in Kubernetes needs --api-key-secret: each replica pod registers with the router's node API, "
        "which answers other machines only with an API key (or use --router lmdeploy, whose node API takes none)"
    )


@dataclass(frozen=True)
class K8sOptions:
    """What ``launch k8s`` adds to the plan request (checked: ``check_options``)."""

    image: str | None
    namespace: str = DEFAULT_NAMESPACE
    name: str | None = None  # None: from MODEL (``default_name``)
    cache_pvc: str | None = None
    api_key_secret: str | None = None
    hf_token_secret: str | None = None
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S


# --- checks ------------------------------------------------------------------------------------

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?", re.ASCII)
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)

# The image reference grammar of the distribution project (reference/regexp.go), the digest as sha256.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?", re.ASCII)
_NAME_TOTAL_MAX = 255  # the repository name, registry included


def _shown(value: str) -> str:
    """A value short enough for a one-line message."""
    return value if len(value) <= 80 else value[:79] + "…"


def check_image(image: str | None) -> str:
    """``--image``: a reference the container runtime pulls, or ``NoImage`` / ``BadImage`` saying why."""
    if image is None:
        raise NoImage()
    if _REFERENCE.fullmatch(image):
        name = image.split("@")[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        if len(name) <= _NAME_TOTAL_MAX:
            return image
        raise BadImage(_shown(image), f"the repository name is longer than {_NAME_TOTAL_MAX} characters")
    raise BadImage(_shown(image), _image_problem(image))


def _image_problem(image: str) -> str:
    if not image.strip():
        return "it is empty"
    if any(ch.isspace() or not ch.isprintable() for ch in image) or not image.isascii():
        return "it holds a blank, a control character or a character outside ASCII"
    rest, at, digest = image.partition("@")
    if at and not re.fullmatch(_DIGEST, digest, re.ASCII):
        return "a digest is sha256: and 64 lowercase hex digits"
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        tag = last.rsplit(":", 1)[1]
        if not re.fullmatch(_TAG, tag, re.ASCII):
            return "a tag is 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
    path = rest.split("/")
    if len(path) > 1 and re.fullmatch(_DOMAIN, path[0], re.ASCII):
        path = path[1:]
    if path and ":" in path[-1]:
        path[-1] = path[-1].rsplit(":", 1)[0]
    if any(part != part.lower() for part in path):
        return "the repository path is lowercase"
    return "the repository path is lowercase letters and digits, parts joined by '/', '.', '_', '__' or '-'"


def _check_name(option: str, value: str, pattern: re.Pattern, rule: str, longest: int) -> str:
    if not (pattern.fullmatch(value) and len(value) <= longest):
        raise BadK8sName(option, _shown(value), rule.format(longest=longest))
    return value


def default_name(model: str) -> str:
    """The objects' name when --name is left out: the preset's name, or the repo id's last part,
    lowercased, with '.' and '_' made '-' (``qwen2.5-7b-instruct`` is ``qwen2-5-7b-instruct``)."""
    return model.rstrip("/").split("/")[-1].lower().replace(".", "-").replace("_", "-")


def check_name(name: str | None, model: str, scale_out: str | None) -> str:
    """``--name`` (else ``default_name(model)``): a DNS-1035 label short enough for what launch
    appends to it in this layout (``NAME_SUFFIXES``), or ``BadK8sName``."""
    longest = NAME_MAX - max(len(suffix) for suffix in NAME_SUFFIXES[scale_out])
    rule = ("a DNS-1035 label of at most {longest} characters here (lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit)")
    if name is None:
        rule += "; it was made from MODEL: give --name NAME"
    return _check_name("--name", default_name(model) if name is None else name, _DNS1035, rule, longest)


def check_options(options: K8sOptions, model: str, scale_out: str | None) -> K8sOptions:
    """``options`` checked (before any config is read): the image, the name for this layout
    (``scale_out``: None, "replicas" or "nodes"), the namespace (a DNS-1123 label), the claim and
    the secrets (DNS-1123 subdomains)."""
    image = check_image(options.image)
    name = check_name(options.name, model, scale_out)
    label = ("a DNS-1123 label of at most {longest} characters (lowercase letters, digits and '-', "
             "starting and ending with a letter or digit)")
    namespace = _check_name("--namespace", options.namespace, _DNS1123_LABEL, label, NAME_MAX)
    subdomain = ("a DNS-1123 subdomain of at most {longest} characters (lowercase letters, digits, '-' "
                 "and '.', each part starting and ending with a letter or digit)")
    for option, value in (("--cache-pvc", options.cache_pvc), ("--api-key-secret", options.api_key_secret),
                          ("--hf-token-secret", options.hf_token_secret)):
        if value is not None:
            _check_name(option, value, _DNS1123_SUBDOMAIN, subdomain, 253)
    return K8sOptions(image=image, namespace=namespace, name=name, cache_pvc=options.cache_pvc,
                      api_key_secret=options.api_key_secret, hf_token_secret=options.hf_token_secret,
                      health_timeout_s=options.health_timeout_s)


def leader_address(options: K8sOptions) -> str:
    """What LWS sets ``LWS_LEADER_ADDRESS`` to for the one group: the leader pod ``NAME-0`` under the
    headless Service LWS makes, named after the LeaderWorkerSet."""
    return f"{options.name}-0.{options.name}.{options.namespace}"


def rendezvous(options: K8sOptions) -> str:
    """The plan's ``--dist-init-addr`` across nodes: the leader's address and the rendezvous port."""
    return f"{leader_address(options)}:{RENDEZVOUS_PORT}"


def cluster_request(request: PlanRequest, options: K8sOptions) -> PlanRequest:
    """``request`` as the pods serve it, checked (``check_request``: every refusal of ``launch plan``):
    on every interface of the pod, and across nodes with the leader's rendezvous (``rendezvous``)."""
    nnodes = FLAGS["nnodes"](request.nnodes)
    across = rendezvous(options) if nnodes > 1 else None
    checked = check_request(replace(request, host=POD_HOST, dist_init_addr=across))
    if checked.router == "vllm" and options.api_key_secret is None:  # resolved by the check (with replicas)
        raise ReplicasNeedKey()
    return checked


def cluster_plan(plan: Plan) -> Plan:
    """``plan`` as the cluster runs it: the GPUs counted on this machine say nothing about the pods' (no
    count, and no warning that this machine has too few), and the memory plan stands only when
    ``--gpu-memory`` gave the GPU (not this machine's)."""
    here = gpu_shortage(plan.engine.config.tp, plan.request.nnodes, plan.gpu_count)
    warnings = tuple(w for w in plan.warnings if here is None or here not in w)
    return replace(plan, gpu_count=None, warnings=warnings,
                   memory=plan.memory if plan.gpu_source == "--gpu-memory" else None)


def cluster_warnings(plan: Plan, options: K8sOptions, own_preset: str | None = None) -> list[str]:
    """What ``launch k8s`` warns about (its caller prints ``warning: LINE``): the plan's own warnings,
    the KV-cache fit left unchecked without ``--gpu-memory``, an API without a key, and a preset of
    this machine (``own_preset``: its file) that the image must hold too."""
    lines = list(cluster_plan(plan).warnings)
    port = plan.request.port
    if plan.gpu_source != "--gpu-memory":
        lines.append("the KV-cache fit is not checked: give --gpu-memory GiB, the free memory of one of the "
                     "cluster's GPUs")
    if options.api_key_secret is None:
        lines.append(f"no --api-key-secret: the OpenAI API on port {port} answers anyone who reaches the "
                     "Service in the cluster")
    if plan.request.router == "lmdeploy":
        lines.append(f"lmdeploy's proxy's node API on port {port} adds and removes replicas without a key: keep "
                     "the Service inside the cluster (a NetworkPolicy helps)")
    if own_preset is not None:
        lines.append(f"{plan.source.label} is your own preset ({own_preset}): the image must have it too, in "
                     "its LAUNCH_PRESETS_DIR, or the pods cannot find it")
    return lines


def layout_for_cluster(plan: Plan) -> ReplicaLayout | NodeLayout | None:
    """The layout the plan's request asks for, checked as ``launch plan`` checks it (lmdeploy's parallel
    rules, the replicas' ports), but on the cluster's GPUs, not this machine's (none counted here)."""
    request = plan.request
    if request.scale_out == "replicas":
        return replicas_for_plan(cluster_plan(plan), request.replicas, environ={}, routing=request.routing,
                                 one_port=True)  # a pod each, all on the next port
    if request.scale_out == "nodes":
        assert request.dist_init_addr is not None  # check_request: nodes need it (``rendezvous``)
        return nodes_for_plan(plan, request.nnodes, request.dist_init_addr)
    return None


# --- commands ----------------------------------------------------------------------------------


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def router_command(port: int, routing: str | None = None, router: str | None = None) -> list[str]:
    """The router's container command: the one place that says which router runs in front of the
    replicas and how (``router`` None: launch's default, vllm-router behind launch's front)."""
    argv = [LAUNCH, "proxy", "start", "--host", POD_HOST, "--port", str(port)]
    if router is not None:
        argv += ["--router", router]
    if routing is not None:
        argv += ["--routing", routing]
    return argv


# The request's values every pod's command sets itself (or that are no concern of one pod).
_SET_HERE = ("host", "port", "gpu_memory_gib", "replicas", "nnodes", "node_rank", "dist_init_addr", "routing",
             "router", "revision")


def pinned_revision(plan: Plan) -> str | None:
    """The revision the pods download: a repo id's at the commit of the config it was planned with (a
    branch may move between this plan and a pod's start, and pods start at different times), else
    what the request asked for (a preset follows its own pin)."""
    source = plan.source
    if source.preset is None and source.repo_id is not None and is_commit_sha(source.revision):
        return source.revision
    return plan.request.revision


def serve_command(plan: Plan, options: K8sOptions, port: int, *extra: str, public: bool = True) -> list[str]:
    """``launch serve MODEL ...`` as a pod runs it: the request's own flags (``serve_argv``), the
    pinned revision, the pod's address (all its interfaces when ``public``, else serve's loopback
    default) and port, the health timeout, then ``extra``."""
    request = plan.request
    argv = [LAUNCH, "serve", request.model, *serve_argv(request, leave_out=_SET_HERE)]
    revision = pinned_revision(plan)
    if revision is not None:
        argv += [f"--revision={revision}"] if revision.startswith("-") else ["--revision", revision]
    host = ["--host", POD_HOST] if public else []
    return argv + [*host, "--port", str(port), "--health-timeout", _number(options.health_timeout_s), *extra]


__all__ = ["BadImage", "BadK8sName", "K8sOptions", "NoImage", "ReplicasNeedKey", "check_image", "check_name",
           "check_options", "cluster_plan", "cluster_request", "cluster_warnings", "default_name",
           "layout_for_cluster", "leader_address", "pinned_revision", "rendezvous", "router_command",
           "serve_command"]
