"""Deploy-spec cases shared by the Kubernetes tests (test_k8s.py, test_k8s_fleet.py): the committed examples,
spec variants that cover every rendered kind, and custom-resource mistakes with what their API says about each."""

from __future__ import annotations

import copy
from pathlib import Path

from lora_deploy.k8s.render import render_manifests
from lora_deploy.k8s.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "deploy").glob("*.yaml"))

BASE = {"name": "bot", "namespace": "llm", "model": "/models/base"}
DYNAMIC = {
    **BASE,
    "mode": "dynamic",
    "adapters": [
        {"name": "a1", "path": "/models/adapters/a1", "rank": 16},
        {"name": "a2", "path": "/models/adapters/a2", "rank": 40},
    ],
}
VARIANTS = {
    "merged-1gpu": {**BASE, "mode": "merged"},
    "dynamic-1gpu": DYNAMIC,
    "dynamic-4gpu": {**DYNAMIC, "gpus": 4, "replicas": 2},
    "dynamic-runtime-hpa": {
        **DYNAMIC,
        "runtimeAdapters": True,
        "apiKeySecret": {"name": "key"},
        "autoscaling": {"enabled": True, "kind": "hpa", "maxReplicas": 3},
    },
    "merged-download-keda": {
        **BASE,
        "model": "org/model",
        "mode": "merged",
        "weights": {"source": "download", "hfTokenSecret": "hf"},
        "autoscaling": {"enabled": True},
    },
    "multinode": {
        **BASE,
        "model": "org/big",
        "mode": "merged",
        "gpus": 8,
        "multiNode": {"nodes": 2},
        "weights": {"source": "hub", "hfTokenSecret": "hf"},
    },
    "multinode-dynamic": {**DYNAMIC, "gpus": 8, "multiNode": {"nodes": 3}},
    "fleet": {
        **DYNAMIC,
        "replicas": 3,
        "apiKeySecret": {"name": "key"},
        "adapterStore": {
            "claim": "adapters",
            "maxLoraRank": 64,
            "publishImage": "example.org/lora-deploy:1",
            "sourceClaim": "uploads",
        },
        "routing": {"kind": "inference-pool", "gateway": "gw"},
        "autoscaling": {"enabled": True},
    },
}


def spec_files(data: dict) -> dict:
    """The rendered files of a deploy spec given as data (parsed from a copy: cases are reused)."""
    return render_manifests(parse_spec(copy.deepcopy(data))).files


def variant_files(name: str) -> dict:
    """The rendered files of the spec variant ``name``."""
    return spec_files(VARIANTS[name])


def mutated(obj: dict, path: str, value) -> dict:
    """A copy of ``obj`` with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    out = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = out
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


DELETE = object()


# A mistake in a custom resource, and what the validator must say about it: (path, value, needle).
LWS_MISTAKES = [  # against the LeaderWorkerSet v1 API; pod templates against the core schemas
    ("spec.leaderWorkerTemplate.workerTemplate.spec.containers.0.env", "x", "workerTemplate"),
    ("spec.leaderWorkerTemplate.leaderTemplate.spec.containers.0.probe", {}, "leaderTemplate"),
    ("spec.leaderWorkerTemplate.sise", 2, "'sise' was unexpected"),
    ("spec.startupPolicy", "LeaderFirst", "'LeaderFirst' is not one of"),
    ("spec.leaderWorkerTemplate.restartPolicy", "Always", "'Always' is not one of"),
    ("spec.leaderWorkerTemplate.size", "2", "'2' is not of type 'integer'"),
    ("spec.leaderWorkerTemplate.size", 0, "size must be equal or greater than 1"),  # LWS's webhook
    ("spec.leaderWorkerTemplate.workerTemplate", DELETE, "'workerTemplate' is a required property"),
    ("spec.rolloutStrategy.rollingUpdateConfiguration.maxUnavailable", 0, "cannot both be 0"),
    ("apiVersion", "leaderworkerset.x-k8s.io/v1beta1", "is not one of ['leaderworkerset.x-k8s.io/v1']"),
]
KEDA_MISTAKES = [  # against KEDA's CRD
    ("spec.minReplicas", 1, "spec.minReplicas: unknown field"),  # the HPA spelling, not KEDA's
    ("spec.triggers.0.metdata", {}, "spec.triggers[0].metdata: unknown field"),
    ("spec.cooldownPeriod", "600", "spec.cooldownPeriod: Input should be a valid integer"),
    ("spec.triggers.0.metadata.threshold", 5, "threshold: Input should be a valid string"),
    ("spec.scaleTargetRef.name", DELETE, "spec.scaleTargetRef.name: Field required"),
    ("spec.triggers", DELETE, "spec.triggers: Field required"),
    ("apiVersion", "keda.sh/v1", "apiVersion: Input should be 'keda.sh/v1alpha1'"),
]
