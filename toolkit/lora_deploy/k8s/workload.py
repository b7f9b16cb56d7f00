"""The vLLM servers: their arguments (from the one flag builder), containers, probes and storage, and the
Deployment or LeaderWorkerSet, Service, disruption budget, network policy and model claim around them."""

from __future__ import annotations

from pathlib import Path

from lora_deploy.errors import InputError
from lora_deploy.k8s.objects import (
    CONFIG_DIR,
    PORT,
    container_security,
    lws_name,
    object_labels,
    object_meta,
    pod_spec,
    secret_env,
    server_selector,
)
from lora_deploy.k8s.spec import DeploySpec
from lora_deploy.k8s.validate import LWS_API
from lora_deploy.serve.flags import GUARD_SERVED_NAMES_ENV, ServeConfig, ServedAdapter, build_vllm_args, resolver_env

# the guard middleware (serve/guard.py) as the pods import it: one file of the ConfigMap, on PYTHONPATH
GUARD_FILE = "lora_deploy_guard.py"
POD_GUARD = "lora_deploy_guard.ApiKeyGuard"


def resolve_ranks(spec: DeploySpec, notes: list[str] | None = None) -> tuple[ServedAdapter, ...]:
    """Each adapter's rank (and whether it is MoE expert LoRA): from the spec, else read from the adapter folder
    when it is readable here. An adapter whose MoE kind cannot be read is served as plain LoRA, and ``notes``
    says so (the spec's ``moeExperts`` settles it)."""
    from lora_deploy.model.adapter import adapter_is_moe_experts, load_adapter

    out = []
    for i, a in enumerate(spec.adapters):
        rank, moe = a.rank, a.moe_experts
        if rank is None:
            if not Path(a.path).is_dir():
                raise InputError(
                    f"adapters[{i}] ({a.name}): no rank given and {a.path} is not readable here",
                    hint="add rank: (the adapter's largest r, rank_pattern included)",
                )
            rank = load_adapter(a.path).max_rank
        if moe is None:
            moe = adapter_is_moe_experts(a.path)
            if moe is None and notes is not None:
                notes.append(
                    f"adapters[{i}] ({a.name}): {a.path} is not readable here, so whether it holds MoE expert "
                    "LoRA (target_parameters) is unknown; rendered as plain LoRA. Set moeExperts: true or "
                    "false on the adapter to decide it"
                )
        out.append(ServedAdapter(a.name, a.path, rank, bool(moe)))
    return tuple(out)


def server_config(spec: DeploySpec, adapters: tuple[ServedAdapter, ...]) -> ServeConfig:
    """The spec's servers as one :class:`ServeConfig` (``adapters`` from :func:`resolve_ranks`): what the manifests
    run and what ``plan --spec`` sizes, so both read one record of the LoRA limits."""
    return ServeConfig(
        model=spec.model,
        served_model_name=spec.base_name,
        adapters=adapters,
        host="0.0.0.0",
        port=PORT,
        # the spec's own settings records; what the spec leaves to the rest of it: the store's rank, the GPUs
        lora=spec.vllm.lora.model_copy(update={"max_lora_rank": spec.max_lora_rank}),
        engine=spec.vllm.engine.model_copy(update={"tensor_parallel_size": spec.tensor_parallel_size}),
        allow_runtime_adapters=spec.runtime_adapters,
        adapter_store=spec.adapter_store.mount_path if spec.adapter_store else None,
        extra_args=spec.vllm.extra_args,
        seed=None,
        api_key_env="VLLM_API_KEY" if spec.api_key_secret else None,
    )


def vllm_args(spec: DeploySpec, adapters: tuple[ServedAdapter, ...]) -> list[str]:
    """`vllm serve` arguments after the model, from the same derivation as `lora-deploy dynamic`."""
    args, _, _ = build_vllm_args(server_config(spec, adapters), cpu_build=False, guard=POD_GUARD)
    return args


def shm_size(gpus: int) -> str:
    return "2Gi" if gpus <= 1 else ("8Gi" if gpus <= 3 else "16Gi")


def model_path(spec: DeploySpec) -> str:
    """Where vLLM finds the model: the spec's pod path, or where the download step puts a hub id."""
    if spec.weights.source == "download":
        return f"{spec.weights.mount_path}/{spec.model.rstrip('/').rsplit('/', 1)[-1]}"
    return spec.model


def server_env(spec: DeploySpec) -> list[dict]:
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "VLLM_DO_NOT_TRACK", "value": "1"},
    ]
    if spec.weights.source == "pvc":
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        env.append({"name": "HF_HOME", "value": "/tmp/hf"})
    else:
        env.append({"name": "HF_HOME", "value": f"{spec.weights.mount_path}/.hf"})
    if spec.weights.hf_token_secret and spec.weights.source == "hub":  # vLLM downloads itself; else the init does
        env.append(secret_env("HF_TOKEN", spec.weights.hf_token_secret, "HF_TOKEN"))
    if spec.api_key_secret:
        env.append(secret_env("VLLM_API_KEY", spec.api_key_secret.name, spec.api_key_secret.key))
    extra = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if spec.runtime_adapters else {}
    if spec.adapter_store is not None:
        extra.update(resolver_env(spec.adapter_store.mount_path))  # the same environment `dynamic` gives vLLM
    if spec.api_key_secret or spec.runtime_api:  # the guard middleware: its file is in the config mount
        extra.update({GUARD_SERVED_NAMES_ENV: spec.base_name, "PYTHONPATH": CONFIG_DIR})
    env += [{"name": k, "value": v} for k, v in extra.items()]
    return env


def store_volume(spec: DeploySpec, *, read_only: bool = True) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the adapter store, when the spec has one: servers and the smoke Job read it, only the
    publish Job writes."""
    store = spec.adapter_store
    if store is None:
        return [], []
    return (
        [{"name": "adapters", "persistentVolumeClaim": {"claimName": store.claim, "readOnly": read_only}}],
        [{"name": "adapters", "mountPath": store.mount_path, "readOnly": read_only}],
    )


def server_volumes(spec: DeploySpec) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the vLLM container: shared memory, model storage, scratch, config."""
    if spec.weights.source == "hub":
        models = {"name": "models", "emptyDir": {}}
    else:
        claim = spec.weights.claim or f"{spec.name}-models"
        models = {
            "name": "models",
            "persistentVolumeClaim": {"claimName": claim, "readOnly": spec.weights.source == "pvc"},
        }
    volumes: list[dict] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec.tensor_parallel_size)}},
        models,
        {"name": "tmp", "emptyDir": {}},
        {"name": "config", "configMap": {"name": f"{spec.name}-config"}},
    ]
    mounts: list[dict] = [
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "models", "mountPath": spec.weights.mount_path, "readOnly": spec.weights.source == "pvc"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    store_volumes, store_mounts = store_volume(spec)
    return volumes + store_volumes, mounts + store_mounts


def server_resources(spec: DeploySpec) -> dict:
    r = spec.resources
    gpus = str(spec.gpus)
    return {
        "requests": {"cpu": r.cpu, "memory": r.memory, r.gpu_resource: gpus},
        "limits": {"memory": r.memory, r.gpu_resource: gpus},
    }


def server_probes(spec: DeploySpec) -> dict:
    downloading = spec.weights.source in ("download", "hub")
    health = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        # weights load before /health answers: a generous budget, so pods are not killed while loading
        "startupProbe": {
            **health,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 180 if downloading else 60,
        },
        # ready = every expected model listed by /v1/models, not merely a live engine
        "readinessProbe": {
            "exec": {"command": ["python3", f"{CONFIG_DIR}/ready.py"]},
            "periodSeconds": 5,
            "timeoutSeconds": 4,
            "failureThreshold": 3,
        },
        "livenessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6},
    }


def vllm_container(spec: DeploySpec, args: list[str], mounts: list[dict], *, probes: bool = True) -> dict:
    c = {
        "name": "vllm",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vllm", "serve"],
        "args": [model_path(spec)] + args,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": server_env(spec),
        "resources": server_resources(spec),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        # let the Service stop sending traffic before vLLM begins shutting down
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "20"]}}},
    }
    if probes:
        c.update(server_probes(spec))
    return c


def download_init(spec: DeploySpec, mounts: list[dict]) -> list[dict]:
    if spec.weights.source != "download":
        return []
    target = model_path(spec)
    init = {
        "name": "download-weights",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["hf", "download", spec.model, "--local-dir", target],
        "env": [e for e in server_env(spec) if e["name"] in ("HOME", "HF_HOME")]  # the token: here only
        + ([secret_env("HF_TOKEN", spec.weights.hf_token_secret, "HF_TOKEN")] if spec.weights.hf_token_secret else []),
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [m for m in mounts if m["name"] in ("models", "tmp")],
        "securityContext": container_security(),
    }
    return [init]


def service(spec: DeploySpec, selector: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(spec, spec.name),
        "spec": {
            "type": spec.service.type,
            "selector": selector,
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pods_service(spec: DeploySpec, selector: dict, template: str) -> dict:
    """A headless Service: its DNS name resolves to every ready server pod of this rollout (``template``, the pod
    template's hash), so the smoke Job checks each new replica and never an old one (a replica that cannot serve an
    adapter fails the Job, where the Service would hide it behind the others)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(spec, pods_service_name(spec)),
        "spec": {
            "clusterIP": "None",
            "selector": {**selector, TEMPLATE_LABEL: template},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pods_service_name(spec: DeploySpec) -> str:
    return f"{spec.name}-pods"


def deployment(spec: DeploySpec, args: list[str]) -> dict:
    volumes, mounts = server_volumes(spec)
    selector = server_selector(spec)
    pod = pod_spec(spec, [vllm_container(spec, args, mounts)], volumes, init=download_init(spec, mounts))
    dep: dict = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(spec, spec.name),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            # GPUs are scarce: replace pods one at a time without needing a spare GPU
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": object_labels(spec)}, "spec": pod},
        },
    }
    if spec.autoscaling.enabled:
        del dep["spec"]["replicas"]  # the autoscaler owns the replica count
    return dep


def leader_worker_set(spec: DeploySpec, args: list[str]) -> dict:
    volumes, mounts = server_volumes(spec)
    nodes = spec.multi_node.nodes
    dist = [
        "--pipeline-parallel-size",
        str(nodes),
        "--distributed-executor-backend",
        "mp",
        "--nnodes",
        "$(LWS_GROUP_SIZE)",
        "--master-addr",
        "$(LWS_LEADER_ADDRESS)",
        "--master-port",
        "29500",
    ]
    leader = vllm_container(spec, args + dist + ["--node-rank", "0"], mounts)
    worker = vllm_container(
        spec, args + dist + ["--node-rank", "$(LWS_WORKER_INDEX)", "--headless"], mounts, probes=False
    )
    worker.pop("ports")  # workers serve no API: the leader does
    init = download_init(spec, mounts)
    return {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": object_meta(spec, lws_name(spec)),
        "spec": {
            "replicas": spec.replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "leaderWorkerTemplate": {
                "size": nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {
                    "metadata": {"labels": {**object_labels(spec), "role": "leader"}},
                    "spec": pod_spec(spec, [leader], volumes, init=init),
                },
                "workerTemplate": {
                    "metadata": {"labels": {**object_labels(spec), "role": "worker"}},
                    "spec": pod_spec(spec, [worker], volumes, init=init),
                },
            },
        },
    }


def disruption_budget(spec: DeploySpec) -> dict:
    """At most one serving pod evicted at a time. For a LeaderWorkerSet this covers workers too: losing any
    pod restarts its whole group, so a drain that took one worker of every group would take every replica."""
    selector = server_selector(spec)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(spec, spec.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def network_policy(spec: DeploySpec, selector: dict) -> dict:
    """Default-deny ingress to the servers while the runtime LoRA API is on, admitting only: the smoke and publish
    Jobs (pods labelled ``lora-deploy/client: "true"`` in the namespace), the endpoint picker and the Gateway's proxy
    pods (with inference-pool routing), and Prometheus's namespace (with a PodMonitor), each by its own selector."""
    np = spec.network_policy
    peers: list[dict] = [{"podSelector": {"matchLabels": {"lora-deploy/client": "true"}}}]
    if spec.routing.kind == "inference-pool":
        peers.append({"podSelector": {"matchLabels": {**object_labels(spec, "endpoint-picker")}}})
        labels = np.gateway_pod_labels or {"gateway.networking.k8s.io/gateway-name": str(spec.routing.gateway)}
        peers.append(
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": np.gateway_namespace or spec.namespace}
                },
                "podSelector": {"matchLabels": labels},
            }
        )
    if spec.pod_monitor:
        peers.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": np.prometheus_namespace}}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(spec, spec.name),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"port": PORT, "protocol": "TCP"}]}],
        },
    }


TEMPLATE_LABEL = "lora-deploy/template"


def stamp_template(template: dict) -> str:
    """Label a server pod template with a hash of itself, so a check can tell this rollout's pods from the previous
    one's (the smoke Job's headless Service selects it); returns the hash."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:12]
    template["metadata"]["labels"][TEMPLATE_LABEL] = digest
    return digest


def models_claim(spec: DeploySpec) -> dict:
    pvc: dict = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": object_meta(spec, spec.weights.claim or f"{spec.name}-models"),
        # one pod may use a node-local volume; several pods (replicas, or a group's nodes) share it
        "spec": {
            "accessModes": ["ReadWriteOnce" if spec.replicas * spec.multi_node.nodes <= 1 else "ReadWriteMany"],
            "resources": {"requests": {"storage": spec.weights.size}},
        },
    }
    if spec.weights.storage_class:
        pvc["spec"]["storageClassName"] = spec.weights.storage_class
    return pvc
