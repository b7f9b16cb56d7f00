"""Adapter-aware routing: an InferencePool of the servers, llm-d's endpoint picker, and an HTTPRoute from a Gateway.

A plain Service spreads requests over the pods without knowing which one already holds the adapter a request
names. With ``routing.kind: inference-pool`` the Gateway asks llm-d's endpoint picker (EPP, ext-proc over gRPC)
for a pod per request; its configuration adds ``lora-affinity-scorer`` to the default queue, KV-cache and
prefix-cache scorers (weights 2/2/3, llm-d's defaults), since the built-in default has no LoRA affinity.

What the scorer reads from vLLM 0.32's ``vllm:lora_requests_info`` (labels ``running_lora_adapters``,
``waiting_lora_adapters``, ``max_lora``): every in-flight adapter appears in both the running and the waiting
label, and idle resident adapters are not listed at all. So "adapter running here" (1.0) is reliable while the
adapter has requests in flight, "room for another" (0.8) reads as full at half of ``max_lora``, and the 0.6 "waiting"
tier never fires. No picker filter checks that a pod *can* serve an adapter: every pod must serve every adapter,
which the adapter store guarantees.

Failure mode: ``FailOpen`` by default (llm-d's chart does the same): while the picker is down the gateway still
routes, without affinity, to any ready pod, which can serve every adapter; ``FailClose`` refuses requests instead.
The picker runs with ``--secure-serving`` (its default: self-signed TLS on the ext-proc port; gateways such as Istio
need a DestinationRule with ``tls: {mode: SIMPLE, insecureSkipVerify: true}``), and with
``--metrics-endpoint-auth=false`` so it needs no cluster-wide RBAC for token reviews: scrape it from inside the
cluster (the PodMonitor), do not expose port 9090.

The HTTPRoute exposes only the inference routes (completions, chat completions, the model list), never
``/v1/load_lora_adapter`` or ``/v1/unload_lora_adapter``.
"""

from __future__ import annotations

from lora_deploy.k8s.objects import container_security, object_labels, object_meta, server_selector
from lora_deploy.k8s.spec import DeploySpec

POOL_API = "inference.networking.k8s.io/v1"
POOL_GROUP = "inference.networking.k8s.io"
PICKER_GRPC_PORT, PICKER_HEALTH_PORT, PICKER_METRICS_PORT = 9002, 9003, 9090
PICKER_CONFIG_FILE = "epp-config.yaml"
# the OpenAI routes the gateway forwards; the runtime LoRA API (load/unload) is never among them
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
# llm-d's default scorers and weights (llm-d-router v0.10.0, loadDefaultConfig), plus LoRA affinity
SCORERS = (
    ("queue-scorer", 2),
    ("kv-cache-utilization-scorer", 2),
    ("prefix-cache-scorer", 3),
    ("lora-affinity-scorer", 1),
)


def pool_name(spec: DeploySpec) -> str:
    return f"{spec.name}-pool"


def picker_name(spec: DeploySpec) -> str:
    return f"{spec.name}-epp"


def picker_config() -> dict:
    """The EndpointPickerConfig (llm-d.ai/v1alpha1): llm-d's default scorers plus ``lora-affinity-scorer``, the
    highest-score picker, one profile."""
    return {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [{"type": name} for name, _ in SCORERS]
        + [{"type": "max-score-picker"}, {"type": "single-profile-handler"}],
        "schedulingProfiles": [
            {
                "name": "default",
                "plugins": [
                    *({"pluginRef": name, "weight": weight} for name, weight in SCORERS),
                    {"pluginRef": "max-score-picker"},
                ],
            }
        ],
    }


def routing_objects(spec: DeploySpec) -> dict[str, dict]:
    """Every object of the inference-pool routing, keyed by file name."""
    import yaml

    name, labels = picker_name(spec), object_labels(spec, "endpoint-picker")
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(spec, name, "endpoint-picker"),
        "data": {PICKER_CONFIG_FILE: yaml.safe_dump(picker_config(), sort_keys=False)},
    }
    return {
        "inferencepool.yaml": _pool(spec),
        "endpoint-picker-config.yaml": config,
        "endpoint-picker.yaml": _picker(spec, labels),
        "endpoint-picker-service.yaml": _picker_service(spec, labels),
        "endpoint-picker-rbac.yaml": _service_account(spec),
        "endpoint-picker-role.yaml": _role(spec),
        "endpoint-picker-rolebinding.yaml": _role_binding(spec),
        "httproute.yaml": _route(spec),
    }


def _pool(spec: DeploySpec) -> dict:
    return {
        "apiVersion": POOL_API,
        "kind": "InferencePool",
        "metadata": object_meta(spec, pool_name(spec)),
        "spec": {
            "selector": {"matchLabels": server_selector(spec)},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {
                "name": picker_name(spec),
                "kind": "Service",
                "port": {"number": PICKER_GRPC_PORT},
                "failureMode": spec.routing.failure_mode,
            },
        },
    }


def _picker(spec: DeploySpec, labels: dict) -> dict:
    name = picker_name(spec)
    probe = {"grpc": {"port": PICKER_HEALTH_PORT, "service": "inference-extension"}}
    container = {
        "name": "epp",
        "image": spec.routing.picker_image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "--pool-name",
            pool_name(spec),
            "--pool-namespace",
            spec.namespace,
            "--pool-group",
            POOL_GROUP,
            "--config-file",
            f"/config/{PICKER_CONFIG_FILE}",
            "--grpc-port",
            str(PICKER_GRPC_PORT),
            "--grpc-health-port",
            str(PICKER_HEALTH_PORT),
            "--metrics-port",
            str(PICKER_METRICS_PORT),
            "--metrics-endpoint-auth=false",
            "--zap-encoder",
            "json",
        ],
        "env": [
            {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [
            {"name": "grpc", "containerPort": PICKER_GRPC_PORT, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": PICKER_HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": PICKER_METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {**probe, "initialDelaySeconds": 5, "periodSeconds": 10},
        "readinessProbe": {**probe, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/config", "readOnly": True}],
        "securityContext": container_security(),
    }
    pod = {
        "serviceAccountName": name,
        "terminationGracePeriodSeconds": 130,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": name}}],
    }
    # one active picker (llm-d's chart): Recreate, so two never hold different views of the pool
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(spec, name, "endpoint-picker"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _picker_service(spec: DeploySpec, labels: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(spec, picker_name(spec), "endpoint-picker"),
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [
                {
                    "name": "grpc-ext-proc",
                    "port": PICKER_GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "http2",
                },  # gRPC over TLS (--secure-serving), as llm-d's own manifests declare
                {"name": "http-metrics", "port": PICKER_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def _service_account(spec: DeploySpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(spec, picker_name(spec), "endpoint-picker"),
    }


def _role(spec: DeploySpec) -> dict:
    """Read-only, namespaced: the pods it picks from, its pool, and llm-d's objectives and model rewrites."""
    read = ["get", "list", "watch"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(spec, picker_name(spec), "endpoint-picker"),
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            {"apiGroups": [POOL_GROUP], "resources": ["inferencepools"], "verbs": read},
            {"apiGroups": ["llm-d.ai"], "resources": ["inferenceobjectives", "inferencemodelrewrites"], "verbs": read},
        ],
    }


def _role_binding(spec: DeploySpec) -> dict:
    name = picker_name(spec)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(spec, name, "endpoint-picker"),
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
    }


def _route(spec: DeploySpec) -> dict:
    backend = {"group": POOL_GROUP, "kind": "InferencePool", "name": pool_name(spec)}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": object_meta(spec, spec.name, "routing"),
        "spec": {
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": spec.routing.gateway}],
            # Exact: a PathPrefix /v1/chat/completions would also forward /v1/chat/completions/batch
            "rules": [
                {
                    "matches": [{"path": {"type": "Exact", "value": path}} for path in INFERENCE_PATHS],
                    "backendRefs": [backend],
                    "timeouts": {"request": spec.routing.request_timeout},
                }
            ],
        },
    }
