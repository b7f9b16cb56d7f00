"""Render a DeploySpec into hardened Kubernetes manifests (a kustomize base), and validate them.

Pure functions: ``render_manifests(spec)`` returns ``{filename: object}``; nothing touches a
cluster. The vLLM flags come from :mod:`lora_deploy.serving`, the same derivation the local
launcher uses. :mod:`lora_deploy.k8s_validate` checks every object before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import EXIT_INPUT, InputError, LoraDeployError
from .k8s_validate import KEDA_API, LWS_API, CrdSchema, validate_manifests
from .serving import ServeConfig, ServedAdapter, build_vllm_args
from .spec import DeploySpec

PORT = 8000
VLLM_UID = 2000  # the official image's `vllm` user
CONFIG_DIR = "/etc/lora-deploy"
SMOKE_DIR = "/opt/lora-deploy"
SPEC_COPY = "lora-deploy-spec.yaml"  # the spec that `merged/dynamic --manifests` writes beside the manifests

READY_SCRIPT = '''\
"""Readiness: the engine is up AND /v1/models lists every expected model (not just /health)."""
import json, os, sys, urllib.request
config = os.environ.get("LORA_DEPLOY_CONFIG_DIR", "/etc/lora-deploy")
want = json.load(open(os.path.join(config, "models.json")))
key = os.environ.get("VLLM_API_KEY")
url = os.environ.get("LORA_DEPLOY_READY_URL", "http://127.0.0.1:8000")
req = urllib.request.Request(url + "/v1/models",
                             headers={"Authorization": "Bearer " + key} if key else {})
try:
    listed = {m["id"] for m in json.load(urllib.request.urlopen(req, timeout=2))["data"]}
except Exception as e:
    sys.exit(f"not ready: {e}")
missing = [m for m in want if m not in listed]
sys.exit(f"not ready: missing {missing}" if missing else 0)
'''

SMOKE_JOB_SCRIPT = '''\
"""In-cluster smoke test: lora-deploy's own smoke module, run against the Service after rollout."""
import json, os, sys, time
import requests
from lora_deploy.smoke import format_report, run_smoke

cfg = json.load(open(os.path.join(os.environ.get("LORA_DEPLOY_CONFIG_DIR", "/etc/lora-deploy"), "smoke.json")))
deadline = time.monotonic() + cfg["wait_seconds"]
while True:  # wait for the rollout: the Service answers once a pod is ready
    try:
        if requests.get(cfg["url"] + "/health", timeout=5).status_code == 200:
            break
    except requests.RequestException:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{cfg['url']} did not become healthy within {cfg['wait_seconds']} s")
    time.sleep(10)
report = run_smoke(cfg["url"], models=cfg["models"], base_model=cfg["base_model"],
                   api_key=os.environ.get("VLLM_API_KEY"), prompt=cfg["prompt"], max_tokens=cfg["max_tokens"])
print(format_report(report), flush=True)
sys.exit(0 if report.passed else 1)
'''


@dataclass(frozen=True)
class RenderedManifests:
    """The kustomize base: file name -> object, in a stable order (kustomization.yaml last)."""

    files: dict[str, dict]
    notes: tuple[str, ...] = ()


def resolve_ranks(spec: DeploySpec, notes: list[str] | None = None) -> tuple[ServedAdapter, ...]:
    """Each adapter's rank (and whether it is MoE expert LoRA): from the spec, else read from the adapter folder
    when it is readable here. An adapter whose MoE kind cannot be read is served as plain LoRA, and ``notes``
    says so (the spec's ``moeExperts`` settles it)."""
    from .adapter import adapter_is_moe_experts, load_adapter

    out = []
    for i, a in enumerate(spec.adapters):
        rank, moe = a.rank, a.moe_experts
        if rank is None:
            if not Path(a.path).is_dir():
                raise InputError(f"adapters[{i}] ({a.name}): no rank given and {a.path} is not readable here",
                                 hint="add rank: (the adapter's largest r, rank_pattern included)")
            rank = load_adapter(a.path).max_rank
        if moe is None:
            moe = adapter_is_moe_experts(a.path)
            if moe is None and notes is not None:
                notes.append(f"adapters[{i}] ({a.name}): {a.path} is not readable here, so whether it holds MoE expert "
                             "LoRA (target_parameters) is unknown; rendered as plain LoRA. Set moeExperts: true or "
                             "false on the adapter to decide it")
        out.append(ServedAdapter(a.name, a.path, rank, bool(moe)))
    return tuple(out)


def vllm_args(spec: DeploySpec, adapters: tuple[ServedAdapter, ...]) -> list[str]:
    """`vllm serve` arguments after the model, from the same derivation as `lora-deploy dynamic`."""
    cfg = ServeConfig(model=spec.model, served_model_name=spec.base_name, adapters=adapters, host="0.0.0.0",
                      port=PORT, dtype=spec.vllm.dtype, max_loras=spec.vllm.max_loras,
                      max_cpu_loras=spec.vllm.max_cpu_loras, max_lora_rank=spec.vllm.max_lora_rank,
                      max_model_len=spec.vllm.max_model_len, allow_runtime_adapters=spec.runtime_adapters,
                      tensor_parallel_size=spec.tensor_parallel_size,
                      gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
                      extra_args=spec.vllm.extra_args, seed=None)
    args, _, _ = build_vllm_args(cfg, cpu_build=False)
    return args


def _labels(spec: DeploySpec, component: str = "server") -> dict[str, str]:
    return {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "lora-deploy"}


def _meta(spec: DeploySpec, name: str, component: str = "server") -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": _labels(spec, component)}


def lws_name(spec: DeploySpec) -> str:
    """The LeaderWorkerSet's name: never the Service's, since LWS names its own headless Service after itself.

    The leader address LWS hands to workers (``LWS_LEADER_ADDRESS``) resolves only through that headless
    Service, and LWS does not create it when a Service of that name already exists.
    """
    return f"{spec.name}-lws"


def _server_selector(spec: DeploySpec) -> dict[str, str]:
    """Every serving pod: a Deployment's pods, or a LeaderWorkerSet's leaders and workers."""
    return {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/component": "server"}


def _shm_size(gpus: int) -> str:
    return "2Gi" if gpus <= 1 else ("8Gi" if gpus <= 3 else "16Gi")


def _model_path(spec: DeploySpec) -> str:
    """Where vLLM finds the model: the spec's pod path, or where the download step puts a hub id."""
    if spec.weights.source == "download":
        return f"{spec.weights.mount_path}/{spec.model.rstrip('/').rsplit('/', 1)[-1]}"
    return spec.model


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(spec: DeploySpec) -> list[dict]:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
           {"name": "VLLM_DO_NOT_TRACK", "value": "1"}]
    if spec.weights.source == "pvc":
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        env.append({"name": "HF_HOME", "value": "/tmp/hf"})
    else:
        env.append({"name": "HF_HOME", "value": f"{spec.weights.mount_path}/.hf"})
    if spec.weights.hf_token_secret:
        env.append(_secret_env("HF_TOKEN", spec.weights.hf_token_secret, "HF_TOKEN"))
    if spec.api_key_secret:
        env.append(_secret_env("VLLM_API_KEY", spec.api_key_secret.name, spec.api_key_secret.key))
    if spec.runtime_adapters:
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    return env


def _security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "runAsUser": VLLM_UID, "runAsGroup": VLLM_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_spec(spec: DeploySpec, containers: list[dict], volumes: list[dict], *, init: list[dict] | None = None,
              restart: str | None = None, grace: int = 90) -> dict:
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": VLLM_UID, "runAsGroup": VLLM_UID,
                            "fsGroup": VLLM_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": grace,
        "containers": containers,
        "volumes": volumes,
    }
    if init:
        pod["initContainers"] = init
    if restart:
        pod["restartPolicy"] = restart
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    return pod


def _volumes(spec: DeploySpec) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the vLLM container: shared memory, model storage, scratch, config."""
    if spec.weights.source == "hub":
        models = {"name": "models", "emptyDir": {}}
    else:
        claim = spec.weights.claim or f"{spec.name}-models"
        models = {"name": "models", "persistentVolumeClaim": {"claimName": claim,
                                                              "readOnly": spec.weights.source == "pvc"}}
    volumes = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(spec.tensor_parallel_size)}},
               models, {"name": "tmp", "emptyDir": {}},
               {"name": "config", "configMap": {"name": f"{spec.name}-config"}}]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"},
              {"name": "models", "mountPath": spec.weights.mount_path, "readOnly": spec.weights.source == "pvc"},
              {"name": "tmp", "mountPath": "/tmp"}, {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    return volumes, mounts


def _resources(spec: DeploySpec) -> dict:
    r = spec.resources
    gpus = str(spec.gpus)
    return {"requests": {"cpu": r.cpu, "memory": r.memory, r.gpu_resource: gpus},
            "limits": {"memory": r.memory, r.gpu_resource: gpus}}


def _probes(spec: DeploySpec) -> dict:
    downloading = spec.weights.source in ("download", "hub")
    health = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        # weights load before /health answers: a generous budget, so pods are not killed while loading
        "startupProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 3,
                         "failureThreshold": 180 if downloading else 60},
        # ready = every expected model listed by /v1/models, not merely a live engine
        "readinessProbe": {"exec": {"command": ["python3", f"{CONFIG_DIR}/ready.py"]}, "periodSeconds": 5,
                           "timeoutSeconds": 4, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6},
    }


def _vllm_container(spec: DeploySpec, args: list[str], mounts: list[dict], *, probes: bool = True) -> dict:
    c = {
        "name": "vllm",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vllm", "serve"],
        "args": [_model_path(spec)] + args,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": _security_context(),
        # let the Service stop sending traffic before vLLM begins shutting down
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "20"]}}},
    }
    if probes:
        c.update(_probes(spec))
    return c


def _download_init(spec: DeploySpec, mounts: list[dict]) -> list[dict]:
    if spec.weights.source != "download":
        return []
    target = _model_path(spec)
    init = {"name": "download-weights", "image": spec.image, "imagePullPolicy": "IfNotPresent",
            "command": ["hf", "download", spec.model, "--local-dir", target],
            "env": [e for e in _env(spec) if e["name"] in ("HOME", "HF_HOME", "HF_TOKEN")],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
            "volumeMounts": [m for m in mounts if m["name"] in ("models", "tmp")],
            "securityContext": _security_context()}
    return [init]


# The modules the smoke Job mounts from the ConfigMap: the smoke test and all it imports (no torch, only requests)
SMOKE_MODULES = ("errors", "client", "smoke")


def _config_map(spec: DeploySpec, adapters: tuple[ServedAdapter, ...]) -> dict:
    models = [spec.base_name] + [a.name for a in adapters]
    url = f"http://{spec.name}.{spec.namespace}.svc:{spec.service.port}"
    smoke = {"url": url, "models": models, "base_model": spec.base_name, "prompt": spec.smoke_test.prompt,
             "max_tokens": spec.smoke_test.max_tokens, "wait_seconds": 3600}
    pkg = resources.files("lora_deploy")
    data = {
        "models.json": json.dumps(models) + "\n",
        "adapters.json": json.dumps([{"name": a.name, "path": a.path, "rank": a.rank} for a in adapters],
                                    indent=2) + "\n",
        "ready.py": READY_SCRIPT,
        "smoke.json": json.dumps(smoke, indent=2) + "\n",
        "smoke_job.py": SMOKE_JOB_SCRIPT,
        # the smoke test's own code, so the Job checks exactly what `lora-deploy smoke` checks
        "lora_deploy__init__.py": '"""lora-deploy smoke test (mounted by the smoke Job)."""\n',
        **{f"lora_deploy_{m}.py": pkg.joinpath(f"{m}.py").read_text() for m in SMOKE_MODULES},
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{spec.name}-config"), "data": data}


def _service(spec: DeploySpec, selector: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, spec.name),
            "spec": {"type": spec.service.type, "selector": selector,
                     "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}]}}


def _deployment(spec: DeploySpec, args: list[str]) -> dict:
    volumes, mounts = _volumes(spec)
    selector = _server_selector(spec)
    pod = _pod_spec(spec, [_vllm_container(spec, args, mounts)], volumes, init=_download_init(spec, mounts))
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, spec.name),
           "spec": {"replicas": spec.replicas, "selector": {"matchLabels": selector},
                    # GPUs are scarce: replace pods one at a time without needing a spare GPU
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                    "template": {"metadata": {"labels": _labels(spec)}, "spec": pod}}}
    if spec.autoscaling.enabled:
        del dep["spec"]["replicas"]  # the autoscaler owns the replica count
    return dep


def _leader_worker_set(spec: DeploySpec, args: list[str]) -> dict:
    volumes, mounts = _volumes(spec)
    nodes = spec.multi_node.nodes
    dist = ["--pipeline-parallel-size", str(nodes), "--distributed-executor-backend", "mp",
            "--nnodes", "$(LWS_GROUP_SIZE)", "--master-addr", "$(LWS_LEADER_ADDRESS)", "--master-port", "29500"]
    leader = _vllm_container(spec, args + dist + ["--node-rank", "0"], mounts)
    worker = _vllm_container(spec, args + dist + ["--node-rank", "$(LWS_WORKER_INDEX)", "--headless"], mounts,
                             probes=False)
    worker.pop("ports")  # workers serve no API: the leader does
    init = _download_init(spec, mounts)
    return {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "metadata": _meta(spec, lws_name(spec)),
            "spec": {"replicas": spec.replicas, "startupPolicy": "LeaderCreated",
                     "rolloutStrategy": {"type": "RollingUpdate",
                                         "rollingUpdateConfiguration": {"maxSurge": 0, "maxUnavailable": 1}},
                     "leaderWorkerTemplate": {
                         "size": nodes, "restartPolicy": "RecreateGroupOnPodRestart",
                         "leaderTemplate": {"metadata": {"labels": {**_labels(spec), "role": "leader"}},
                                            "spec": _pod_spec(spec, [leader], volumes, init=init)},
                         "workerTemplate": {"metadata": {"labels": {**_labels(spec), "role": "worker"}},
                                            "spec": _pod_spec(spec, [worker], volumes, init=init)}}}}


def _pdb(spec: DeploySpec) -> dict:
    """At most one serving pod evicted at a time. For a LeaderWorkerSet this covers workers too: losing any
    pod restarts its whole group, so a drain that took one worker of every group would take every replica."""
    selector = _server_selector(spec)
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(spec, spec.name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}


def _smoke_job(spec: DeploySpec) -> dict:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONPATH", "value": SMOKE_DIR}]
    if spec.api_key_secret:
        env.append(_secret_env("VLLM_API_KEY", spec.api_key_secret.name, spec.api_key_secret.key))
    items = [{"key": "smoke_job.py", "path": "smoke_job.py"},
             {"key": "lora_deploy__init__.py", "path": "lora_deploy/__init__.py"},
             *({"key": f"lora_deploy_{m}.py", "path": f"lora_deploy/{m}.py"} for m in SMOKE_MODULES)]
    container = {"name": "smoke-test", "image": spec.image, "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", f"{SMOKE_DIR}/smoke_job.py"], "env": env,
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
                 "volumeMounts": [{"name": "smoke", "mountPath": SMOKE_DIR, "readOnly": True},
                                  {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                  {"name": "tmp", "mountPath": "/tmp"}],
                 "securityContext": _security_context()}
    volumes = [{"name": "smoke", "configMap": {"name": f"{spec.name}-config", "items": items}},
               {"name": "config", "configMap": {"name": f"{spec.name}-config"}}, {"name": "tmp", "emptyDir": {}}]
    pod = _pod_spec(spec, [container], volumes, restart="Never", grace=10)
    pod.pop("nodeSelector", None)
    pod.pop("tolerations", None)  # the check needs no GPU node
    labels = {**_labels(spec, "smoke-test"), "lora-deploy/client": "true"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(spec, f"{spec.name}-smoke-test", "smoke-test"),
            "spec": {"backoffLimit": 1, "activeDeadlineSeconds": 4200, "ttlSecondsAfterFinished": 86400,
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}


def _network_policy(spec: DeploySpec, selector: dict) -> dict:
    """With runtime adapter loading on, only labelled clients in the namespace may reach the server."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(spec, spec.name),
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"lora-deploy/client": "true"}}}],
                                  "ports": [{"port": PORT, "protocol": "TCP"}]}]}}


def _pvc(spec: DeploySpec) -> dict:
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": _meta(spec, spec.weights.claim or f"{spec.name}-models"),
           # one pod may use a node-local volume; several pods (replicas, or a group's nodes) share it
           "spec": {"accessModes": ["ReadWriteOnce" if spec.replicas * spec.multi_node.nodes <= 1
                                    else "ReadWriteMany"],
                    "resources": {"requests": {"storage": spec.weights.size}}}}
    if spec.weights.storage_class:
        pvc["spec"]["storageClassName"] = spec.weights.storage_class
    return pvc


def _autoscaler(spec: DeploySpec) -> tuple[str, dict]:
    a = spec.autoscaling
    query = f'sum(vllm:num_requests_waiting{{namespace="{spec.namespace}",pod=~"{spec.name}-.*"}})'
    if a.kind == "keda":
        return "scaledobject.yaml", {
            "apiVersion": KEDA_API, "kind": "ScaledObject", "metadata": _meta(spec, spec.name),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                     "minReplicaCount": a.min_replicas, "maxReplicaCount": a.max_replicas,
                     "cooldownPeriod": 600, "pollingInterval": 15,
                     "triggers": [{"type": "prometheus", "metadata": {
                         "serverAddress": a.prometheus_address, "query": query,
                         "threshold": str(a.target_waiting)}}]}}
    return "hpa.yaml", {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(spec, spec.name),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                 "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas,
                 "metrics": [{"type": "External", "external": {
                     "metric": {"name": "vllm_num_requests_waiting",
                                "selector": {"matchLabels": {"deployment": spec.name}}},
                     "target": {"type": "AverageValue", "averageValue": str(a.target_waiting)}}}],
                 "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}}


def render_manifests(spec: DeploySpec) -> RenderedManifests:
    """Every object of the rollout, keyed by file name, plus the kustomization that lists them."""
    notes: list[str] = []
    adapters = resolve_ranks(spec, notes) if spec.mode == "dynamic" else ()
    args = vllm_args(spec, adapters)
    files: dict[str, dict] = {}
    files["configmap.yaml"] = _config_map(spec, adapters)
    if spec.multi_node.nodes > 1:
        files["leaderworkerset.yaml"] = _leader_worker_set(spec, args)
        selector = {"app.kubernetes.io/name": spec.name, "role": "leader"}  # only leaders serve the API
        notes.append(f"multi-node: LeaderWorkerSet {lws_name(spec)} (needs the LWS controller in the cluster)")
    else:
        files["deployment.yaml"] = _deployment(spec, args)
        selector = _server_selector(spec)
    files["service.yaml"] = _service(spec, selector)
    files["pdb.yaml"] = _pdb(spec)
    if spec.weights.source == "download" and not spec.weights.claim:
        files["pvc.yaml"] = _pvc(spec)
    if spec.runtime_adapters:
        files["networkpolicy.yaml"] = _network_policy(spec, selector)
        notes.append("runtime adapters: only pods labelled lora-deploy/client=true may reach the server")
    if spec.autoscaling.enabled:
        name, obj = _autoscaler(spec)
        files[name] = obj
        notes.append(f"autoscaling with {spec.autoscaling.kind} on vllm:num_requests_waiting")
    if spec.smoke_test.enabled:
        files["smoke-test-job.yaml"] = _smoke_job(spec)
    files["kustomization.yaml"] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                   "resources": list(files)}
    return RenderedManifests(files, tuple(notes))


def dump_yaml(obj: dict) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # shared lists are written out in full: no &id001 / *id001 in manifests
            return True

    def _str(dumper, data):
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def write_manifests(rendered: RenderedManifests, output: Path, *, force: bool = False,
                    crds: Mapping[tuple[str, str], CrdSchema] | None = None) -> list[Path]:
    """Validate, then write every file into ``output`` (through a temporary folder; replaced only with force).

    ``crds`` (from :func:`lora_deploy.k8s_validate.load_crds`) validates custom resources against those CRDs.
    """
    from ._files import staged_folder

    problems = validate_manifests(rendered.files, crds=crds)
    if problems:
        raise LoraDeployError("refusing to write manifests that fail their schemas:\n"
                              + "\n".join(f"  - {p}" for p in problems), exit_code=EXIT_INPUT)
    output = Path(output)
    if output.exists() and not force and any(output.iterdir()):
        from .errors import OutputError

        raise OutputError(f"{output} already holds files", hint="pass --force to replace them")
    with staged_folder(output, force=True, what="the manifests") as staged:
        for name, obj in rendered.files.items():
            (staged.path / name).write_text("# Generated by lora-deploy; edit the deploy spec and re-render.\n"
                                            + dump_yaml(obj))
    return [output / n for n in rendered.files]


def compare_with(rendered: RenderedManifests, folder: Path) -> list[str]:
    """Files in ``folder`` that differ from a fresh render (empty when the committed output is current)."""
    diffs = []
    want = {n: "# Generated by lora-deploy; edit the deploy spec and re-render.\n" + dump_yaml(o)
            for n, o in rendered.files.items()}
    have = ({p.name: p.read_text() for p in Path(folder).glob("*.yaml") if p.name != SPEC_COPY}
            if Path(folder).is_dir() else {})
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            diffs.append(name)
    return diffs
