"""Check rendered manifests against the schemas the cluster will hold them to, before anything is written.

Each kind is checked against the most authoritative schema that can be installed from a package index:

- built-in kinds (Deployment, Service, Job, ...): the Kubernetes OpenAPI schemas for
  :data:`KUBERNETES_VERSION`, through ``kubernetes-validate`` in strict mode (unknown fields fail, as
  ``kubectl apply --validate=strict`` does);
- KEDA ``ScaledObject``: the models that ``cloudcoil-models-keda`` generates from KEDA's published CRD
  file, validated with strict types, with every key the CRD does not know reported as an error;
- ``LeaderWorkerSet``: LWS publishes its CRD only in its own release assets, which no package index
  carries, so its ``v1`` API is written down here (:data:`LWS_V1_SCHEMA`: fields, types, enums, required
  keys, unknown keys refused), and its leader and worker pod templates are checked as core PodTemplates.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

KUBERNETES_VERSION = "1.33.0"  # the schema version manifests are validated against
LWS_API = "leaderworkerset.x-k8s.io/v1"
KEDA_API = "keda.sh/v1alpha1"

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_COUNT = {**_INT32, "minimum": 0}
_INT_OR_STRING = {"type": ["integer", "string"]}  # intstr.IntOrString: 1 or "25%"
_OBJECT = {"type": "object"}  # a core type, checked by the Kubernetes schemas separately


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """An object schema that refuses keys it does not list, as a structural CRD does."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# The LeaderWorkerSet v1 API (sigs.k8s.io/lws, api/leaderworkerset/v1): written from its Go types and their
# kubebuilder markers (enums, defaults, required fields). Pod templates, PVC templates and metadata are core
# types and are checked against the Kubernetes schemas by validate_object.
LWS_V1_SCHEMA = _closed({
    "apiVersion": {"const": LWS_API},
    "kind": {"const": "LeaderWorkerSet"},
    "metadata": _OBJECT,
    "spec": _closed({
        "replicas": _COUNT,
        "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
        "networkConfig": _closed({"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
                                 ("subdomainPolicy",)),
        "rolloutStrategy": _closed({
            "type": {"enum": ["RollingUpdate"]},
            "rollingUpdateConfiguration": _closed({"partition": _COUNT, "maxUnavailable": _INT_OR_STRING,
                                                   "maxSurge": _INT_OR_STRING}),
        }, ("type",)),
        "leaderWorkerTemplate": _closed({
            "leaderTemplate": _OBJECT,
            "workerTemplate": _OBJECT,
            "size": {**_INT32, "minimum": 1},
            "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]},
            "subGroupPolicy": _closed({"subGroupPolicyType": {"enum": ["LeaderWorker", "LeaderExcluded"]},
                                       "subGroupSize": {**_INT32, "minimum": 1}}),
            "volumeClaimTemplates": {"type": "array", "items": _OBJECT},
            "persistentVolumeClaimRetentionPolicy": _OBJECT,
        }, ("workerTemplate",)),
    }, ("leaderWorkerTemplate",)),
    "status": _OBJECT,
}, ("apiVersion", "kind", "metadata", "spec"))


def schema_versions() -> dict[str, str]:
    """What each kind is validated against, for reports (`lora-deploy manifests --json`)."""
    from importlib.metadata import version

    keda = ".".join(version("cloudcoil.models.keda").split(".")[:3])  # the 4th part is cloudcoil's build
    return {"kubernetes": KUBERNETES_VERSION, "keda": keda, "leaderworkerset": "v1 API (typed in lora-deploy)"}


def validate_object(obj: dict, version: str = KUBERNETES_VERSION) -> list[str]:
    """Every problem with one object, each naming the field; empty when the cluster would accept it."""
    kind = obj.get("kind")
    if kind == "Kustomization":
        return [] if isinstance(obj.get("resources"), list) else ["kustomization has no resources list"]
    if kind == "LeaderWorkerSet":
        return _validate_lws(obj, version)
    if kind == "ScaledObject":
        return _validate_scaled_object(obj)
    return _validate_core(obj, version)


def validate_manifests(files: dict[str, dict], version: str = KUBERNETES_VERSION) -> list[str]:
    """Problems across a whole base, each prefixed with its file name."""
    return [f"{name}: {p}" for name, obj in files.items() for p in validate_object(obj, version)]


def _validate_core(obj: dict, version: str) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    kind = obj.get("kind")
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except ValidationError as e:
        return [f"{kind} {obj.get('metadata', {}).get('name')}: {_path(e.path)}: {e.message}"]
    except SchemaNotFoundError as e:
        return [f"{kind}: no schema for {obj.get('apiVersion')} in Kubernetes {version} ({e})"]
    return []


def _validate_lws(obj: dict, version: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(LWS_V1_SCHEMA)
    problems = [f"LeaderWorkerSet: {_path(e.absolute_path) or '(top)'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    template = obj.get("spec", {}).get("leaderWorkerTemplate", {}) if isinstance(obj.get("spec"), dict) else {}
    for role in ("leaderTemplate", "workerTemplate"):
        if isinstance(template.get(role), dict):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": obj.get("metadata", {}),
                       "template": template[role]}
            problems += [f"spec.leaderWorkerTemplate.{role}: {p}" for p in _validate_core(wrapped, version)]
    rolling = (obj.get("spec", {}).get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    if rolling.get("maxSurge", 0) in (0, "0%") and rolling.get("maxUnavailable", 1) in (0, "0%"):
        # the LWS admission webhook refuses this: a rollout could never make progress
        problems.append("LeaderWorkerSet: spec.rolloutStrategy.rollingUpdateConfiguration: maxUnavailable and "
                        "maxSurge cannot both be 0")
    return problems


@lru_cache(maxsize=1)
def _scaled_object_model():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    return ScaledObject


def _validate_scaled_object(obj: dict) -> list[str]:
    import pydantic

    try:
        model = _scaled_object_model().model_validate(obj, strict=True)
    except pydantic.ValidationError as e:
        return [f"ScaledObject: {_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    # the generated models ignore unknown keys; a structural CRD prunes them, so a typo would silently vanish
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"ScaledObject: {p}: unknown field (not in KEDA's CRD)" for p in _dropped_keys(obj, kept)]


def _dropped_keys(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of keys in ``given`` that are missing from ``kept`` (the validated model's own dump)."""
    out = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            out += [where] if key not in kept else _dropped_keys(value, kept[key], where)
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            out += _dropped_keys(g, k, f"{path}[{i}]")
    return out


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
