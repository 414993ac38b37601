"""`launch k8s`: the Kubernetes objects that serve MODEL as `launch plan` plans it."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.cli.options import (
    ENGINE_FLAGS,
    MODEL_FLAGS,
    REQUEST_FLAGS,
    ROUTER_FLAGS,
    number,
    optional,
    request_command,
    request_flag,
)
from launcher.engine.spec import DEFAULT_PORT
from launcher.plan.request import PlanRequest
from launcher.rules import limits
from launcher.runtime.supervise import DEFAULT_HEALTH_TIMEOUT_S

PortOpt = request_flag(
    "port", metavar="PORT", default=DEFAULT_PORT,
    help="Port of the OpenAI API: the Service's and the pod's (the router's with --replicas; the replicas' "
    "pods use the next one).")
ReplicasOpt = request_flag(
    "replicas", default=1, help="N engines, a pod each with tp GPUs, behind the router's Service on --port.")
NnodesOpt = request_flag(
    "nnodes", default=1,
    help="One engine across N pods (TurboMind, a LeaderWorkerSet): --tp is the TOTAL, tp/N GPUs per pod.")
HealthTimeoutOpt = number(
    limits.SECONDS, "--health-timeout", metavar="SECONDS", example=3600, default=DEFAULT_HEALTH_TIMEOUT_S,
    help="Seconds a pod has to download, load and answer /health (its startup probe; serve waits as long "
    "for the load).")
# The request's --port, --replicas and --nnodes, said of pods.
POD_FLAGS = tuple(REQUEST_FLAGS[name].replace(annotation=annotation)
                  for name, annotation in (("port", PortOpt), ("replicas", ReplicasOpt), ("nnodes", NnodesOpt)))
ImageOpt = optional(
    str, "--image", metavar="IMAGE",
    help="The container image the pods run: launch installed, `launch` on its PATH.")
NamespaceOpt = Annotated[
    str, typer.Option("--namespace", metavar="NS", help="The namespace of every object.")]
NameOpt = optional(
    str, "--name", metavar="NAME",
    help="The objects' name (and prefix). Default: MODEL's name, lowercase, '.' and '_' as '-'.")
CachePvcOpt = optional(
    str, "--cache-pvc", metavar="CLAIM",
    help="A PersistentVolumeClaim for the Hugging Face cache, kept across restarts (ReadWriteMany for "
    "replicas on several nodes). Default: an emptyDir, which every new pod downloads into again.")
ApiKeySecretOpt = optional(
    str, "--api-key-secret", metavar="SECRET",
    help="A Secret whose key LAUNCH_API_KEYS holds the API keys (comma separated); every launch container "
    "reads it.")
HfTokenSecretOpt = optional(
    str, "--hf-token-secret", metavar="SECRET",
    help="A Secret whose key HF_TOKEN holds a Hugging Face token, for gated or private models.")
K8sOutOpt = optional(
    str, "--out", "-o", metavar="DIR",
    help="Write one file per object (NN-kind-name.yaml) into this new or empty directory instead of "
    "printing them.")


@app.command(
    epilog=(
        "Examples:  launch k8s internlm2_5-7b-chat --factor 2 --image registry.example.com/launch:0.1.0 "
        "| kubectl apply -f -   |   launch k8s qwen2.5-7b-instruct --context 64k --tp 2 --replicas 4 "
        "--image IMAGE --api-key-secret launch-keys --cache-pvc hf-cache --out k8s/   |   "
        "launch k8s internlm2_5-7b-chat --factor 4 --tp 16 --nnodes 2 --image IMAGE --gpu-memory 80"
    )
)
@request_command(MODEL_FLAGS, ENGINE_FLAGS, "revision", "trust_remote_code", "model_name", POD_FLAGS, ROUTER_FLAGS)
def k8s(
    request: PlanRequest,
    image: ImageOpt = None,
    health_timeout: HealthTimeoutOpt = DEFAULT_HEALTH_TIMEOUT_S,
    namespace: NamespaceOpt = "default",
    name: NameOpt = None,
    cache_pvc: CachePvcOpt = None,
    api_key_secret: ApiKeySecretOpt = None,
    hf_token_secret: HfTokenSecretOpt = None,
    out: K8sOutOpt = None,
) -> None:
    """Print the Kubernetes objects that serve MODEL as `launch plan` plans it, each pod running serve.

    One engine: a Deployment and a Service. --replicas N: the router (Deployment and Service) and N
    replicas (one Deployment), each pod one engine. --nnodes N: a LeaderWorkerSet (the LWS controller
    must be installed) and a Service for its leader. Every refusal of `launch plan` is made here,
    before anything is printed or written.
    """
    from launcher.app.serve import refusal
    from launcher.plan.build import build_plan
    from launcher.runtime.address import say_warnings
    from launcher.scaleout import k8s as kube
    from launcher.scaleout import manifests as kobjects

    options = kube.check_options(kube.K8sOptions(
        image=image, namespace=namespace, name=name, cache_pvc=cache_pvc, api_key_secret=api_key_secret,
        hf_token_secret=hf_token_secret, health_timeout_s=health_timeout), request.model, request.scale_out)
    request = kube.cluster_request(request, options)
    target = None
    if out is not None:
        from launcher.eval.runfiles import check_out_dir

        target = check_out_dir(out, example="./k8s")
    plan = build_plan(request)
    layout = kube.layout_for_cluster(plan)
    refused = refusal(kube.cluster_plan(plan), here=False)  # what serve in the pods would refuse
    if refused is not None:
        raise refused
    objects = kobjects.manifests(plan, layout, options)
    say_warnings(kube.cluster_warnings(plan, options, _own_preset(plan)), sys.stderr)
    if target is None:
        sys.stdout.write(kobjects.to_yaml(objects))
        return
    from launcher.eval.runfiles import RunDir

    with RunDir.claim(target) as run:
        for file_name, text in kobjects.file_texts(objects):
            print(run.write(file_name, text.encode()))
    if run.note:
        print(f"note: {run.note}", file=sys.stderr)


def _own_preset(plan) -> str | None:
    """The file of the plan's preset when it is one of this machine's own (not launch's built-in)."""
    if plan.source.preset is None:
        return None
    from launcher.model.presets import preset_files

    entry = preset_files().get(plan.source.label)
    return None if entry is None or entry.builtin else str(entry.path)
