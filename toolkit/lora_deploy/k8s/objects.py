"""What every rendered object shares: names, labels, the port, the pod and container security settings."""

from __future__ import annotations

from lora_deploy.k8s.spec import CONFIG_MOUNT, DeploySpec

CONFIG_DIR = CONFIG_MOUNT  # where the pods read the ConfigMap
PORT = 8000
VLLM_UID = 2000  # the official image's `vllm` user
SMOKE_DIR = "/opt/lora-deploy"


def object_labels(spec: DeploySpec, component: str = "server") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "lora-deploy",
    }


def object_meta(spec: DeploySpec, name: str, component: str = "server") -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": object_labels(spec, component)}


def lws_name(spec: DeploySpec) -> str:
    """The LeaderWorkerSet's name: never the Service's, since LWS names its own headless Service after itself.

    The leader address LWS hands to workers (``LWS_LEADER_ADDRESS``) resolves only through that headless
    Service, and LWS does not create it when a Service of that name already exists.
    """
    return f"{spec.name}-lws"


def server_selector(spec: DeploySpec) -> dict[str, str]:
    """Every serving pod: a Deployment's pods, or a LeaderWorkerSet's leaders and workers."""
    return {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/component": "server"}


def secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def container_security() -> dict:
    # the root filesystem is read-only: HOME, /tmp and the caches are emptyDirs, models and config are mounts
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "runAsUser": VLLM_UID,
        "runAsGroup": VLLM_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_spec(
    spec: DeploySpec,
    containers: list[dict],
    volumes: list[dict],
    *,
    init: list[dict] | None = None,
    restart: str | None = None,
    grace: int = 90,
) -> dict:
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": VLLM_UID,
            "runAsGroup": VLLM_UID,
            "fsGroup": VLLM_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
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
