"""Render a DeploySpec into hardened Kubernetes manifests (a kustomize base), validate them, write them.

Pure functions: ``render_manifests(spec)`` returns ``{filename: object}``; nothing touches a cluster. Each concern
renders in its own module (:mod:`.workload`, :mod:`.autoscaling`, :mod:`.jobs`); the vLLM flags come from
:mod:`lora_deploy.serve.flags`, the same derivation the local launcher uses. :mod:`lora_deploy.k8s.validate`
checks every object before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_deploy.errors import InputError
from lora_deploy.k8s.autoscaling import autoscaler
from lora_deploy.k8s.jobs import config_map, publish_job, smoke_job
from lora_deploy.k8s.monitoring import pod_monitors
from lora_deploy.k8s.objects import lws_name, server_selector
from lora_deploy.k8s.routing import pool_name, routing_objects
from lora_deploy.k8s.spec import DeploySpec
from lora_deploy.k8s.validate import CrdSchema, validate_manifests
from lora_deploy.k8s.workload import (
    deployment,
    disruption_budget,
    leader_worker_set,
    models_claim,
    network_policy,
    pods_service,
    resolve_ranks,
    service,
    stamp_template,
    vllm_args,
)

SPEC_COPY = "lora-deploy-spec.yaml"  # the spec that `merged/dynamic --manifests` writes beside the manifests


@dataclass(frozen=True)
class RenderedManifests:
    """The kustomize base: file name -> object, in a stable order (kustomization.yaml last)."""

    files: dict[str, dict]
    notes: tuple[str, ...] = ()


def render_manifests(spec: DeploySpec) -> RenderedManifests:
    """Every object of the rollout, keyed by file name, plus the kustomization that lists them."""
    notes: list[str] = []
    adapters = resolve_ranks(spec, notes) if spec.mode == "dynamic" else ()
    args = vllm_args(spec, adapters)
    files: dict[str, dict] = {}
    files["configmap.yaml"] = config_map(spec, adapters)
    if spec.multi_node.nodes > 1:
        files["leaderworkerset.yaml"] = leader_worker_set(spec, args)
        template = stamp_template(files["leaderworkerset.yaml"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
        selector = {"app.kubernetes.io/name": spec.name, "role": "leader"}  # only leaders serve the API
        notes.append(f"multi-node: LeaderWorkerSet {lws_name(spec)} (needs the LWS controller in the cluster)")
    else:
        files["deployment.yaml"] = deployment(spec, args)
        template = stamp_template(files["deployment.yaml"]["spec"]["template"])
        selector = server_selector(spec)
    files["service.yaml"] = service(spec, selector)
    files["service-pods.yaml"] = pods_service(spec, selector, template)
    files["pdb.yaml"] = disruption_budget(spec)
    if spec.weights.source == "download" and not spec.weights.claim:
        files["pvc.yaml"] = models_claim(spec)
    if spec.service.type != "ClusterIP" and spec.api_key_secret is None:
        notes.append(
            f"WARNING: service.type {spec.service.type} exposes the servers outside the cluster with no API "
            "key: anyone who reaches the node or load balancer can use them (set apiKeySecret)"
        )
    if spec.runtime_api:
        files["networkpolicy.yaml"] = network_policy(spec, selector)
        notes.append(
            "runtime LoRA API on: only the Jobs (pods labelled lora-deploy/client=true)"
            + (", the endpoint picker and the Gateway's pods" if spec.routing.kind == "inference-pool" else "")
            + (f", and namespace {spec.network_policy.prometheus_namespace} (Prometheus)" if spec.pod_monitor else "")
            + " may reach the servers"
        )
    if spec.autoscaling.enabled:
        name, obj = autoscaler(spec)
        files[name] = obj
        notes.append(f"autoscaling with {spec.autoscaling.kind} on vllm:num_requests_waiting")
    picker = spec.routing.kind == "inference-pool"
    if picker:
        files.update(routing_objects(spec))
        notes.append(
            f"routing: InferencePool {pool_name(spec)} with llm-d's endpoint picker (lora-affinity-scorer), "
            f"HTTPRoute on Gateway {spec.routing.gateway} (needs the InferencePool CRD and a Gateway "
            "implementation with the inference extension)"
        )
    if spec.pod_monitor:
        files.update(pod_monitors(spec, picker=picker))
        notes.append("monitoring: PodMonitor (needs the Prometheus Operator); the autoscaler reads what it scrapes")
    elif spec.autoscaling.enabled:
        notes.append(
            "monitoring.podMonitor is off: something else must make Prometheus scrape the servers' /metrics, "
            "or the autoscaler reads nothing"
        )
    if spec.smoke_test.enabled:
        files["smoke-test-job.yaml"] = smoke_job(spec)
    templates = []
    if spec.adapter_store is not None:
        notes.append(
            f"adapter store: claim {spec.adapter_store.claim} (ReadWriteMany) at "
            f"{spec.adapter_store.mount_path}; publish with lora-deploy adapters publish"
        )
        if spec.adapter_store.publish_image:
            files["publish-job.yaml"] = publish_job(spec)
            templates.append("publish-job.yaml")
            notes.append(
                "publish-job.yaml is a template outside the kustomization: set ADAPTER_SOURCE and "
                "ADAPTER_NAME, then kubectl create -f publish-job.yaml"
            )
        else:
            notes.append(
                "no publish Job: set adapterStore.publishImage to an image with lora-deploy installed to "
                "publish from inside the cluster"
            )
    files["kustomization.yaml"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f for f in files if f not in templates],
    }
    return RenderedManifests(files, tuple(notes))


def dump_yaml(obj: dict) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # noqa: ARG002 - PyYAML's signature; shared lists are written out in full: no &id001 / *id001 in manifests
            return True

    def _str(dumper, data):
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def write_manifests(
    rendered: RenderedManifests,
    output: Path,
    *,
    force: bool = False,
    crds: Mapping[tuple[str, str], CrdSchema] | None = None,
) -> list[Path]:
    """Validate, then write every file into ``output`` (through a temporary folder; replaced only with force).

    ``crds`` (from :func:`lora_deploy.k8s.validate.load_crds`) validates custom resources against those CRDs.
    """
    from lora_deploy._files import staged_folder

    problems = validate_manifests(rendered.files, crds=crds)
    if problems:
        raise InputError(
            "refusing to write manifests that fail their schemas:\n" + "\n".join(f"  - {p}" for p in problems),
        )
    output = Path(output)
    if output.exists() and not force and any(output.iterdir()):
        from lora_deploy.errors import OutputError

        raise OutputError(f"{output} already holds files", hint="pass --force to replace them")
    with staged_folder(output, force=True, what="the manifests") as staged:
        for name, obj in rendered.files.items():
            (staged.path / name).write_text(
                "# Generated by lora-deploy; edit the deploy spec and re-render.\n" + dump_yaml(obj)
            )
    return [output / n for n in rendered.files]


def compare_with(rendered: RenderedManifests, folder: Path) -> list[str]:
    """Files in ``folder`` that differ from a fresh render (empty when the committed output is current)."""
    diffs = []
    want = {
        n: "# Generated by lora-deploy; edit the deploy spec and re-render.\n" + dump_yaml(o)
        for n, o in rendered.files.items()
    }
    have = (
        {p.name: p.read_text() for p in Path(folder).glob("*.yaml") if p.name != SPEC_COPY}
        if Path(folder).is_dir()
        else {}
    )
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            diffs.append(name)
    return diffs
