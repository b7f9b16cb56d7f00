"""Check rendered manifests against the schemas the cluster will hold them to, before anything is written.

Each kind is checked against the most authoritative schema that can be installed from a package index:

- built-in kinds (Deployment, Service, Job, ...): the Kubernetes OpenAPI schemas for
  :data:`KUBERNETES_VERSION`, through ``kubernetes-validate`` in strict mode (unknown fields fail, as
  ``kubectl apply --validate=strict`` does);
- KEDA ``ScaledObject``, prometheus-operator ``PodMonitor`` and ``ServiceMonitor``: the models that
  ``cloudcoil-models-keda`` and ``cloudcoil-models-prometheus-operator`` generate from those projects' published
  CRD files, validated with strict types, with every key the CRD does not know reported as an error;
- ``LeaderWorkerSet``: LWS publishes its CRD only in its own release assets, which no package index
  carries, so its ``v1`` API is written down here (:data:`LWS_V1_SCHEMA`: fields, types, enums, required
  keys, unknown keys refused), and its leader and worker pod templates are checked as core PodTemplates.

InferencePool and HTTPRoute (:data:`CRD_ONLY_KINDS`): no package index carries their schemas, so without a CRD file
they are checked for shape only (apiVersion, kind, metadata.name, a spec) and reported as not schema-validated
(:func:`unvalidated_files`); pass their CRDs with ``--crd`` (``lora-deploy crds`` downloads the published ones, see
:mod:`lora_deploy.k8s.crds`) to validate them strictly.

A CRD file you supply (:func:`load_crds`, ``lora-deploy manifests --crd FILE``; for instance the one your
cluster serves, ``kubectl get crd leaderworkersets.leaderworkerset.x-k8s.io -o yaml``) replaces the built-in
check for its kinds: the object is validated against that CRD's ``openAPIV3Schema``, strictly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lora_deploy.errors import InputError

KUBERNETES_VERSION = "1.33.0"  # the schema version manifests are validated against
LWS_API = "leaderworkerset.x-k8s.io/v1"
KEDA_API = "keda.sh/v1alpha1"

# custom resources lora-deploy renders with no schema available offline: checked strictly only against a supplied CRD
CRD_ONLY_KINDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepools.inference.networking.k8s.io",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes.gateway.networking.k8s.io",
}
# custom resources checked offline against models generated from their project's published CRD (cloudcoil), by
# kind (the model's own apiVersion refuses another version): kind -> (module, class, distribution, report label)
MODEL_KINDS = {
    "ScaledObject": ("cloudcoil.models.keda.v1alpha1", "ScaledObject", "cloudcoil.models.keda", "keda"),
    "PodMonitor": (
        "cloudcoil.models.prometheus_operator.v1",
        "PodMonitor",
        "cloudcoil-models-prometheus-operator",
        "PodMonitor",
    ),
    "ServiceMonitor": (
        "cloudcoil.models.prometheus_operator.v1",
        "ServiceMonitor",
        "cloudcoil-models-prometheus-operator",
        "ServiceMonitor",
    ),
}

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_COUNT = {**_INT32, "minimum": 0}
_INT_OR_STRING = {"type": ["integer", "string"]}  # intstr.IntOrString: 1 or "25%"
_OBJECT = {"type": "object"}  # a core type, checked by the Kubernetes schemas separately


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """An object schema that refuses keys it does not list, as a structural CRD does."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# The LeaderWorkerSet v1 API (sigs.k8s.io/lws, api/leaderworkerset/v1): written from its Go types and their
# kubebuilder markers (enums, defaults, required fields). Pod templates, PVC templates and metadata are core
# types and are checked against the Kubernetes schemas by validate_object. JSON Schema draft 4, the dialect
# of a CRD's openAPIV3Schema, so one validator serves this and supplied CRDs alike.
LWS_V1_SCHEMA = _closed(
    {
        "apiVersion": {"enum": [LWS_API]},
        "kind": {"enum": ["LeaderWorkerSet"]},
        "metadata": _OBJECT,
        "spec": _closed(
            {
                "replicas": _COUNT,
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "networkConfig": _closed(
                    {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}}, ("subdomainPolicy",)
                ),
                "rolloutStrategy": _closed(
                    {
                        "type": {"enum": ["RollingUpdate"]},
                        "rollingUpdateConfiguration": _closed(
                            {"partition": _COUNT, "maxUnavailable": _INT_OR_STRING, "maxSurge": _INT_OR_STRING}
                        ),
                    },
                    ("type",),
                ),
                "leaderWorkerTemplate": _closed(
                    {
                        "leaderTemplate": _OBJECT,
                        "workerTemplate": _OBJECT,
                        "size": _INT32,  # >= 1 is the webhook's rule (below), not the CRD's
                        "restartPolicy": {
                            "enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]
                        },
                        "subGroupPolicy": _closed(
                            {"subGroupPolicyType": {"enum": ["LeaderWorker", "LeaderExcluded"]}, "subGroupSize": _INT32}
                        ),
                        "volumeClaimTemplates": {"type": "array", "items": _OBJECT},
                        "persistentVolumeClaimRetentionPolicy": _OBJECT,
                    },
                    ("workerTemplate",),
                ),
            },
            ("leaderWorkerTemplate",),
        ),
        "status": _OBJECT,
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


@dataclass(frozen=True)
class CrdSchema:
    """One served version of a CustomResourceDefinition, as a strict JSON Schema for its custom resources.

    Strict the way ``kubectl apply --validate=strict`` is: a key the schema does not list is an error
    (a structural CRD would silently prune it), unless the CRD marks that object
    ``x-kubernetes-preserve-unknown-fields``. CEL rules (``x-kubernetes-validations``) are not evaluated.
    """

    api_version: str  # group/version, e.g. leaderworkerset.x-k8s.io/v1
    kind: str
    schema: dict
    source: str  # the file it was read from, for reports


def load_crds(paths: Iterable[str | Path]) -> dict[tuple[str, str], CrdSchema]:
    """Every served version of every CustomResourceDefinition in ``paths``, keyed by (apiVersion, kind).

    A file may hold several YAML documents (a release's ``manifests.yaml``, say); objects that are not
    CRDs are skipped, but a file with no CRD at all is an error, since it was named to be used. A folder stands for
    every ``*.yaml`` file in it (``lora-deploy crds`` fills one with the published CRDs).
    """
    import yaml

    crds: dict[tuple[str, str], CrdSchema] = {}
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found_files = sorted(p for p in path.glob("*.yaml") if p.is_file() and not p.is_symlink())
            if not found_files:
                raise InputError(
                    f"CRD folder {path} holds no .yaml files", hint="fill it with `lora-deploy crds --dir FOLDER`"
                )
            files += found_files
        else:
            files.append(path)
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        except FileNotFoundError as e:
            raise InputError(f"CRD file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({e})") from e
        found = 0
        for doc in docs:
            items = doc.get("items", []) if doc.get("kind") == "List" else [doc]  # `kubectl get crd -o yaml`
            for crd in (i for i in items if isinstance(i, dict) and i.get("kind") == "CustomResourceDefinition"):
                spec = crd.get("spec", {})
                group, kind = spec.get("group"), spec.get("names", {}).get("kind")
                for v in spec.get("versions", []):
                    schema = (v.get("schema") or {}).get("openAPIV3Schema")
                    if not (group and kind and schema) or not v.get("served", True):
                        continue
                    key = (f"{group}/{v['name']}", kind)
                    crds[key] = CrdSchema(key[0], kind, _strict(schema), str(path))
                    found += 1
        if not found:
            raise InputError(
                f"{path}: no CustomResourceDefinition with an openAPIV3Schema in it",
                hint="export one from a cluster with: kubectl get crd NAME -o yaml > FILE",
            )
    return crds


_SUBSCHEMAS = ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not")


def _strict(node: Any) -> Any:
    """An OpenAPI v3 CRD schema as JSON Schema, closed to unknown keys (see CrdSchema)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue  # OpenAPI extensions, translated below
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMAS:
            out[key] = _strict(value)
        else:
            out[key] = value  # type, enum, required, format, description, ...
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def schema_versions(crds: Mapping[tuple[str, str], CrdSchema] | None = None) -> dict[str, str]:
    """What each kind is validated against, for reports (`lora-deploy manifests --json`)."""
    from importlib.metadata import version

    def models(dist: str) -> str:
        return ".".join(version(dist).split(".")[:3])  # the 4th part is cloudcoil's build

    out = {
        "kubernetes": KUBERNETES_VERSION,
        "leaderworkerset": "v1 API (typed in lora-deploy)",
        **{
            label: (models(dist) if label == "keda" else f"{models(dist)} models of prometheus-operator's CRD")
            for _, _, dist, label in MODEL_KINDS.values()
        },
        **{kind: "shape only (pass its CRD with --crd)" for _, kind in CRD_ONLY_KINDS},
    }
    named = set()
    for (api_version, kind), crd in (crds or {}).items():  # a CRD's first served version (its preferred one)
        label = {"ScaledObject": "keda", "LeaderWorkerSet": "leaderworkerset"}.get(kind, kind)
        if label not in out and (api_version, kind) not in CRD_ONLY_KINDS:
            continue  # a CRD for a kind lora-deploy does not render: nothing was validated against it
        if label not in named:
            out[label] = f"{api_version} CRD from {crd.source}"
            named.add(label)
    return out


def validate_object(
    obj: dict, version: str = KUBERNETES_VERSION, crds: Mapping[tuple[str, str], CrdSchema] | None = None
) -> list[str]:
    """Every problem with one object, each naming the field; empty when the cluster would accept it."""
    kind = str(obj.get("kind", ""))
    if kind == "Kustomization":
        return [] if isinstance(obj.get("resources"), list) else ["kustomization has no resources list"]
    key = (str(obj.get("apiVersion", "")), kind)
    crd = (crds or {}).get(key)
    if kind == "LeaderWorkerSet":  # a supplied CRD replaces only the schema: the webhook's rules still apply
        return _validate_lws(obj, version, crd.schema if crd else LWS_V1_SCHEMA)
    if crd is not None:
        return _json_schema_problems(crd.schema, obj, kind)
    if key in CRD_ONLY_KINDS:
        return _shape_problems(obj)
    if kind in MODEL_KINDS:
        return _validate_with_model(obj, MODEL_KINDS[kind])
    return _validate_core(obj, version)


def validate_manifests(
    files: dict[str, dict], version: str = KUBERNETES_VERSION, crds: Mapping[tuple[str, str], CrdSchema] | None = None
) -> list[str]:
    """Problems across a whole base, each prefixed with its file name."""
    return [f"{name}: {p}" for name, obj in files.items() for p in validate_object(obj, version, crds)]


def unvalidated_files(files: dict[str, dict], crds: Mapping[tuple[str, str], CrdSchema] | None = None) -> list[str]:
    """The files whose kind was checked for shape only (a CRD-only kind with no CRD supplied), with the CRD to pass."""
    return [
        f"{name} ({obj['kind']}: kubectl get crd {CRD_ONLY_KINDS[key]} -o yaml > FILE, then --crd FILE)"
        for name, obj in files.items()
        if (key := (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))) in CRD_ONLY_KINDS
        and key not in (crds or {})
    ]


def _shape_problems(obj: dict) -> list[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        return [f"{obj.get('kind')}: metadata.name is missing"]
    if not isinstance(obj.get("spec"), dict):
        return [f"{obj.get('kind')}: spec is missing"]
    return []


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


def _json_schema_problems(schema: dict, obj: dict, kind: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(schema)
    return [
        f"{kind}: {_path(e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _validate_lws(obj: dict, version: str, schema: dict) -> list[str]:
    """``schema``, then the leader and worker templates as core PodTemplates, then the LWS webhook's rule."""
    problems = _json_schema_problems(schema, obj, "LeaderWorkerSet")
    template = obj.get("spec", {}).get("leaderWorkerTemplate", {}) if isinstance(obj.get("spec"), dict) else {}
    for role in ("leaderTemplate", "workerTemplate"):
        if isinstance(template.get(role), dict):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": obj.get("metadata", {}),
                "template": template[role],
            }
            problems += [f"spec.leaderWorkerTemplate.{role}: {p}" for p in _validate_core(wrapped, version)]
    # the LWS admission webhook's rules (pkg/webhooks/leaderworkerset_webhook.go), which no CRD schema carries
    size = template.get("size", 1)
    if isinstance(size, int) and size < 1:
        problems.append("LeaderWorkerSet: spec.leaderWorkerTemplate.size: size must be equal or greater than 1")
    sub = (template.get("subGroupPolicy") or {}).get("subGroupSize", 1)
    if isinstance(sub, int) and sub < 1:
        problems.append(
            "LeaderWorkerSet: spec.leaderWorkerTemplate.subGroupPolicy.subGroupSize: subGroupSize must "
            "be equal or greater than 1"
        )
    rolling = (obj.get("spec", {}).get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    if rolling.get("maxSurge", 0) in (0, "0%") and rolling.get("maxUnavailable", 1) in (0, "0%"):
        # the LWS admission webhook refuses this: a rollout could never make progress
        problems.append(
            "LeaderWorkerSet: spec.rolloutStrategy.rollingUpdateConfiguration: maxUnavailable and "
            "maxSurge cannot both be 0"
        )
    return problems


@cache
def _model(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def _validate_with_model(obj: dict, where: tuple[str, str, str, str]) -> list[str]:
    """``obj`` against the pydantic model generated from its project's published CRD, strictly typed."""
    import pydantic

    module, name, dist, _ = where
    try:
        model = _model(module, name).model_validate(obj, strict=True)
    except pydantic.ValidationError as e:
        return [f"{name}: {_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    # the generated models ignore unknown keys; a structural CRD prunes them, so a typo would silently vanish
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{name}: {p}: unknown field (not in the published CRD; {dist})" for p in _dropped_keys(obj, kept)]


def _dropped_keys(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of keys in ``given`` that are missing from ``kept`` (the validated model's own dump)."""
    out = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            out += [where] if key not in kept else _dropped_keys(value, kept[key], where)
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept, strict=False)):
            out += _dropped_keys(g, k, f"{path}[{i}]")
    return out


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
