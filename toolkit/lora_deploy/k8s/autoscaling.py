"""Autoscaling the servers on vLLM's queue: a KEDA ScaledObject (Prometheus trigger) or an HPA on an external
metric."""

from __future__ import annotations

from lora_deploy.k8s.objects import object_meta
from lora_deploy.k8s.spec import DeploySpec
from lora_deploy.k8s.validate import KEDA_API


def autoscaler(spec: DeploySpec) -> tuple[str, dict]:
    a = spec.autoscaling
    # the labels the PodMonitor's scrape adds (monitoring.py); a Deployment's pods are NAME-<hash>-<hash>, which
    # leaves out other pods of the rollout (NAME-epp-..., NAME-smoke-test-...)
    query = f'sum(vllm:num_requests_waiting{{namespace="{spec.namespace}",pod=~"{spec.name}-[a-z0-9]+-[a-z0-9]+"}})'
    if a.kind == "keda":
        return "scaledobject.yaml", {
            "apiVersion": KEDA_API,
            "kind": "ScaledObject",
            "metadata": object_meta(spec, spec.name),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                "minReplicaCount": a.min_replicas,
                "maxReplicaCount": a.max_replicas,
                "cooldownPeriod": 600,
                "pollingInterval": 15,
                "triggers": [
                    {
                        "type": "prometheus",
                        "metadata": {
                            "serverAddress": a.prometheus_address,
                            "query": query,
                            "threshold": str(a.target_waiting),
                        },
                    }
                ],
            },
        }
    return "hpa.yaml", {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(spec, spec.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": "vllm_num_requests_waiting",
                            "selector": {"matchLabels": {"deployment": spec.name}},
                        },
                        "target": {"type": "AverageValue", "averageValue": str(a.target_waiting)},
                    },
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }
