"""The fleet's manifests: the adapter store on every server, InferencePool routing with llm-d's endpoint picker,
PodMonitors, the per-replica smoke Job and the publish Job, all held to the published CRDs (helpers.published_crds:
$LORA_DEPLOY_CRDS, ../shared/crds or the cache `make crds` fills)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from helpers import published_crds, run_cli
from k8s_cases import DYNAMIC, EXAMPLES, KEDA_MISTAKES, LWS_MISTAKES, VARIANTS, mutated, spec_files, variant_files
from lora_deploy.errors import InputError
from lora_deploy.k8s.spec import load_spec, parse_spec
from lora_deploy.k8s.validate import CRD_ONLY_KINDS, KUBERNETES_VERSION, load_crds, validate_manifests, validate_object
from lora_deploy.serve.flags import resolver_env

FLEET = VARIANTS["fleet"]


@pytest.fixture(scope="module")
def crds():
    return load_crds([published_crds()])  # a folder: every published CRD file in it


def _custom(files: dict) -> dict:
    """The custom resources among ``files``: the kinds the Kubernetes OpenAPI schemas do not define. Every object is
    sorted into one side (a schema lookup that fails for another reason fails the test), none is dropped."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    out = {}
    for name, obj in files.items():
        if obj["kind"] == "Kustomization":
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            out[name] = obj
        except ValidationError:  # a schema exists (whether the object meets it is asserted by validate_manifests)
            pass
    return out


# the custom resources each variant renders: what the CRD check below must have seen, no fewer
CUSTOM_KINDS = {
    "merged-1gpu": set(),
    "dynamic-1gpu": set(),
    "dynamic-4gpu": set(),
    "dynamic-runtime-hpa": {"PodMonitor"},
    "merged-download-keda": {"ScaledObject", "PodMonitor"},
    "multinode": {"LeaderWorkerSet"},
    "multinode-dynamic": {"LeaderWorkerSet"},
    "fleet": {"ScaledObject", "InferencePool", "HTTPRoute", "PodMonitor"},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_custom_resource_passes_its_published_crd(name, crds):
    """Every custom resource we render (LeaderWorkerSet, ScaledObject, InferencePool, HTTPRoute, PodMonitor) is
    valid under the CRD its project publishes, and a CRD exists for each: nothing passes unchecked, and the check saw
    exactly the custom resources the variant renders."""
    assert set(CUSTOM_KINDS) == set(VARIANTS)
    files = variant_files(name)
    assert validate_manifests(files, crds=crds) == []
    custom = _custom(files)
    for fname, obj in custom.items():
        assert (obj["apiVersion"], obj["kind"]) in crds, f"{fname}: no published CRD for {obj['kind']}"
    assert {o["kind"] for o in custom.values()} == CUSTOM_KINDS[name]


@pytest.mark.parametrize("spec_file", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_committed_examples_pass_the_published_crds(spec_file, crds, tmp_path):
    """`manifests --crd DIR` takes every published CRD at once (the folder `lora-deploy crds` fills); nothing is
    left shape-only."""
    rc, stdout, stderr = run_cli(
        "manifests", str(spec_file), "--output", str(tmp_path / "out"), "--crd", str(published_crds()), "--json"
    )
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["not_schema_validated"] == []
    if "support-fleet" in spec_file.stem:  # each kind reports the version it was rendered in, not another one
        assert report["validated_against"]["HTTPRoute"].startswith("gateway.networking.k8s.io/v1 ")


# (file, path, value, what the CRD says)
CRD_MISTAKES = [
    ("inferencepool.yaml", "spec.targetPorts", [], "should be non-empty"),
    ("inferencepool.yaml", "spec.endpointPickerRef.failureMode", "Sometimes", "is not one of"),
    ("inferencepool.yaml", "spec.selector.app", "x", "'app' was unexpected"),
    ("httproute.yaml", "spec.rules.0.backendRefs.0.kind", 7, "is not of type 'string'"),
    ("httproute.yaml", "spec.rules.0.timeout", {"request": "1s"}, "'timeout' was unexpected"),
    ("podmonitor.yaml", "spec.podMetricsEndpoints.0.intervall", "15s", "'intervall' was unexpected"),
    ("podmonitor.yaml", "spec.selector", "all", "is not of type 'object'"),
]


@pytest.mark.parametrize("fname,path,value,needle", CRD_MISTAKES)
def test_the_published_crds_refuse_mistakes(fname, path, value, needle, crds):
    obj = variant_files("fleet")[fname]
    assert validate_object(obj, crds=crds) == []
    problems = validate_object(mutated(obj, path, value), crds=crds)
    assert any(needle in p for p in problems), problems


def test_without_a_crd_the_new_kinds_are_checked_for_shape_and_reported(tmp_path):
    spec = tmp_path / "fleet.yaml"
    spec.write_text(yaml.safe_dump(FLEET))
    rc, stdout, stderr = run_cli("manifests", str(spec), "--output", str(tmp_path / "out"), "--json")
    assert rc == 0, stderr
    unchecked = json.loads(stdout)["not_schema_validated"]
    assert {u.split(" ")[0] for u in unchecked} == {"inferencepool.yaml", "httproute.yaml"}
    assert "not validated against a schema" in stderr and "--crd" in stderr
    assert {kind for _, kind in CRD_ONLY_KINDS} == {"InferencePool", "HTTPRoute"}


# PodMonitor mistakes that the models generated from prometheus-operator's CRD refuse offline, without any CRD file
PODMONITOR_MISTAKES = [
    ("spec.podMetricsEndpoints.0.intervall", "15s", "intervall: unknown field"),
    ("spec.selector", "all", "spec.selector"),
    ("spec.podMetricsEndpoints.0.port", 8000, "spec.podMetricsEndpoints"),
    ("spec.podMetricsEndpoints.0.scheme", 7, "spec.podMetricsEndpoints"),
]


@pytest.mark.parametrize("path,value,needle", PODMONITOR_MISTAKES)
def test_pod_monitors_are_validated_offline_against_prometheus_operators_models(path, value, needle):
    """PodMonitor needs no CRD file: cloudcoil's models of prometheus-operator's published CRD check it strictly
    (types, unknown keys), both ways: the rendered monitors pass, each mistake is refused naming its field."""
    files = variant_files("fleet")
    for fname in ("podmonitor.yaml", "podmonitor-endpoint-picker.yaml"):
        assert validate_object(files[fname]) == [], fname
    problems = validate_object(mutated(files["podmonitor.yaml"], path, value))
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize("path,value,needle", PODMONITOR_MISTAKES)
def test_the_pod_monitor_models_agree_with_the_published_crd(path, value, needle, crds):
    """No drift between the offline models and the published CRD: every mistake the models refuse, the CRD refuses."""
    obj = variant_files("fleet")["podmonitor.yaml"]
    assert validate_object(obj, crds=crds) == []
    assert validate_object(mutated(obj, path, value), crds=crds)


def _server(files: dict) -> dict:
    return files["deployment.yaml"]["spec"]["template"]["spec"]


def test_servers_mount_the_store_read_only_with_the_resolvers_environment():
    files = variant_files("fleet")
    pod = _server(files)
    vllm = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert {k: env[k] for k in resolver_env("/adapters")} == resolver_env("/adapters")  # what `dynamic` gives vLLM
    mount = next(m for m in vllm["volumeMounts"] if m["name"] == "adapters")
    assert mount == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}
    claim = next(v for v in pod["volumes"] if v["name"] == "adapters")["persistentVolumeClaim"]
    assert claim == {"claimName": "adapters", "readOnly": True}
    args = vllm["args"]
    assert args[args.index("--max-lora-rank") + 1] == "64"  # the store's limit: every published adapter loads
    assert "--enable-lora" in args
    # the store's record must name this --model: the publish Job writes it from the same path
    publish = files["publish-job.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert publish[publish.index("--model") + 1] == args[0]
    assert publish[publish.index("--max-lora-rank") + 1] == "64"


def test_the_publish_job_is_a_template_with_the_store_writable():
    files = variant_files("fleet")
    job = files["publish-job.yaml"]
    assert "publish-job.yaml" not in files["kustomization.yaml"]["resources"]
    assert job["metadata"]["generateName"] == "bot-publish-" and "name" not in job["metadata"]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["lora-deploy", "adapters", "publish"] and c["image"] == "example.org/lora-deploy:1"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["adapters"]["readOnly"] is False and mounts["models"]["readOnly"] is True
    assert mounts["sources"] == {"name": "sources", "mountPath": "/sources", "readOnly": True}
    no_image = spec_files({**FLEET, "adapterStore": {"claim": "adapters", "maxLoraRank": 64}})
    assert "publish-job.yaml" not in no_image


def test_the_publish_job_reads_s3_with_a_secret_or_a_role_never_literal_keys():
    """adapterStore.sourceSecret becomes envFrom (the keys stay in the Secret), sourceServiceAccount the Job's
    ServiceAccount (IRSA / workload identity); without them the Job has neither. The rendered Job passes the
    Kubernetes schema like every other object (render_manifests validates it)."""
    store = {**FLEET["adapterStore"], "sourceSecret": "s3-reader", "sourceServiceAccount": "adapter-publisher"}
    files = spec_files({**FLEET, "adapterStore": store})
    pod = files["publish-job.yaml"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-reader"}}]
    assert pod["serviceAccountName"] == "adapter-publisher"
    assert not [e for e in container["env"] if e["name"].startswith("AWS_")]  # no key is ever written here
    assert "s3://" in next(e["value"] for e in container["env"] if e["name"] == "ADAPTER_SOURCE")
    plain = variant_files("fleet")["publish-job.yaml"]["spec"]["template"]["spec"]
    assert "envFrom" not in plain["containers"][0] and "serviceAccountName" not in plain
    with pytest.raises(InputError, match="adapterStore.sourceSecret"):
        spec_files({**FLEET, "adapterStore": {**store, "sourceSecret": "S3 Reader"}})


def test_routing_exposes_only_inference_routes_through_the_pool():
    files = variant_files("fleet")
    route = files["httproute.yaml"]["spec"]
    paths = [m["path"]["value"] for rule in route["rules"] for m in rule["matches"]]
    # exact paths: a prefix /v1/chat/completions would forward /v1/chat/completions/batch too
    assert {m["path"]["type"] for rule in route["rules"] for m in rule["matches"]} == {"Exact"}
    assert paths and all(p.startswith("/v1/") for p in paths)
    assert not [p for p in paths if "lora_adapter" in p or p in ("/", "/v1", "/v1/")]
    assert route["parentRefs"][0]["name"] == "gw"
    assert route["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "bot-pool"}
    ]
    pool = files["inferencepool.yaml"]["spec"]
    server_labels = files["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= server_labels.items()  # the servers, and only them
    picker_labels = files["endpoint-picker.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert not pool["selector"]["matchLabels"].items() <= picker_labels.items()
    assert pool["endpointPickerRef"]["name"] == files["endpoint-picker-service.yaml"]["metadata"]["name"]
    assert pool["endpointPickerRef"]["failureMode"] == "FailOpen"


def test_the_endpoint_picker_scores_lora_affinity_with_least_privilege():
    files = variant_files("fleet")
    config = yaml.safe_load(files["endpoint-picker-config.yaml"]["data"]["epp-config.yaml"])
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= types
    (profile,) = config["schedulingProfiles"]
    refs = {p["pluginRef"] for p in profile["plugins"]}
    assert refs <= types and "lora-affinity-scorer" in refs  # every reference names a declared plugin
    role = files["endpoint-picker-role.yaml"]
    assert role["kind"] == "Role"  # namespaced, no ClusterRole
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    picker = files["endpoint-picker.yaml"]["spec"]
    c = picker["template"]["spec"]["containers"][0]
    assert picker["strategy"] == {"type": "Recreate"} and ":" in c["image"] and not c["image"].endswith(":latest")
    assert c["readinessProbe"]["grpc"]["port"] == 9003
    args = c["args"]
    assert args[args.index("--pool-name") + 1] == files["inferencepool.yaml"]["metadata"]["name"]


def test_the_autoscaler_reads_what_the_pod_monitor_scrapes():
    files = variant_files("fleet")
    monitor = files["podmonitor.yaml"]["spec"]
    server_labels = files["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= server_labels.items()
    assert monitor["podMetricsEndpoints"][0]["port"] == "http"  # vLLM's /metrics is on its API port
    query = files["scaledobject.yaml"]["spec"]["triggers"][0]["metadata"]["query"]
    assert 'namespace="llm"' in query and "vllm:num_requests_waiting" in query  # labels the Operator adds
    assert "podmonitor-endpoint-picker.yaml" in files
    off = spec_files({**FLEET, "monitoring": {"podMonitor": False}})
    assert "podmonitor.yaml" not in off
    assert "podmonitor.yaml" in spec_files({**DYNAMIC, "autoscaling": {"enabled": True}})  # on with autoscaling
    assert "podmonitor.yaml" not in spec_files(DYNAMIC)


def test_the_smoke_job_checks_every_replica_and_the_stores_adapters():
    files = variant_files("fleet")
    smoke = json.loads(files["configmap.yaml"]["data"]["smoke.json"])
    headless = files["service-pods.yaml"]
    assert headless["spec"]["clusterIP"] == "None"
    assert files["service.yaml"]["spec"]["selector"].items() <= headless["spec"]["selector"].items()
    assert smoke["pods_host"] == "bot-pods.llm.svc" and smoke["store"] == "/adapters"
    assert smoke["replicas"] == 1  # autoscaling: its minimum
    job = files["smoke-test-job.yaml"]["spec"]["template"]["spec"]
    mount = next(m for m in job["containers"][0]["volumeMounts"] if m["name"] == "adapters")
    assert mount["readOnly"] is True
    # only this rollout's pods: the headless Service selects the pod template's own hash, which changes with it
    labels = files["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"]["lora-deploy/template"] == labels["lora-deploy/template"]
    changed = spec_files({**FLEET, "vllm": {"maxLoras": 6}})
    assert changed["service-pods.yaml"]["spec"]["selector"]["lora-deploy/template"] != labels["lora-deploy/template"]
    assert "lora-deploy/template" not in files["service.yaml"]["spec"]["selector"]  # the Service keeps old pods
    # the publish Job tells every ready pod of the rollout (the same headless name), with the API key
    publish = files["publish-job.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert publish["args"][publish["args"].index("--replicas") + 1] == "bot-pods.llm.svc:8000"
    assert {e["name"] for e in publish["env"]} >= {"VLLM_API_KEY"}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"apiKeySecret": None}, "adapterStore: needs apiKeySecret"),
        ({"mode": "merged", "adapters": []}, "only a dynamic deployment serves adapters from a store"),
        ({"vllm": {"maxLoraRank": 16}}, "below adapterStore.maxLoraRank 64"),
        ({"adapterStore": {"claim": "adapters", "maxLoraRank": 48}}, "is not one vLLM accepts"),
        ({"adapterStore": {"claim": "adapters"}}, "missing required key(s): maxLoraRank"),
        ({"adapterStore": {"claim": "adapters", "maxLoraRank": 64, "mountPath": "/models"}}, "mountPath"),
        ({"routing": {"kind": "inference-pool"}}, "routing.gateway"),
        ({"routing": {"kind": "mesh", "gateway": "gw"}}, "routing.kind"),
        ({"routing": {"kind": "inference-pool", "gateway": "gw", "failureMode": "Maybe"}}, "failureMode"),
        ({"monitoring": {"podMonitors": True}}, "monitoring.podMonitors: unknown key (did you mean podMonitor?)"),
        ({"runtimeAdapters": True}, "shut out the Gateway"),
        ({"routing": {"kind": "inference-pool", "gateway": "gw", "requestTimeout": "5 minutes"}}, "requestTimeout"),
        ({"routing": {"kind": "inference-pool", "gateway": "My_Gateway"}}, "routing.gateway"),
        ({"adapterStore": {"claim": "adapters", "maxLoraRank": 64, "mountPath": "/sources"}}, "mountPath"),
        ({"service": {"type": "LoadBalancer"}}, "would expose vLLM's runtime LoRA API"),
        ({"service": {"type": "NodePort"}}, "would expose vLLM's runtime LoRA API"),
        ({"networkPolicy": {"prometheusNamespace": "Monitoring!"}}, "networkPolicy.prometheusNamespace"),
    ],
)
def test_fleet_spec_mistakes_are_named(change, needle):
    data = {k: v for k, v in {**copy.deepcopy(FLEET), **change}.items() if v is not None}
    with pytest.raises(InputError) as err:
        parse_spec(data)
    assert needle in str(err.value), str(err.value)


def test_the_fleet_example_is_committed():
    assert any(
        load_spec(p).adapter_store is not None and load_spec(p).routing.kind == "inference-pool" for p in EXAMPLES
    )


@pytest.mark.parametrize(
    "variant,fname,path,value",
    [("multinode", "leaderworkerset.yaml", p, v) for p, v, _ in LWS_MISTAKES]
    + [("merged-download-keda", "scaledobject.yaml", p, v) for p, v, _ in KEDA_MISTAKES],
)
def test_the_built_in_checks_agree_with_the_published_crds(variant, fname, path, value, crds):
    """Where no CRD is given, LeaderWorkerSet and ScaledObject are checked by built-in schemas (LWS's v1 API typed
    here, KEDA's generated models); every mistake those refuse, the published CRD refuses too (no drift)."""
    obj = variant_files(variant)[fname]
    assert validate_object(obj, crds=crds) == []
    assert validate_object(mutated(obj, path, value))  # built in
    assert validate_object(mutated(obj, path, value), crds=crds)  # the published CRD


def test_crds_fetches_the_published_files_and_refuses_any_other(tmp_path):
    """`lora-deploy crds` (what `make crds` runs), through the console script: from an offline copy and from an HTTP
    mirror (a real server on 127.0.0.1) every file of the table arrives with its published sha256 and a second run
    downloads nothing; a file with other bytes is refused (exit 3, naming it) and nothing of it is kept."""
    import functools
    import http.server
    import shutil
    import threading

    from helpers import assert_user_error, free_port, run_console
    from lora_deploy.k8s.crds import PUBLISHED_CRDS, missing_crds

    source = published_crds()
    done = run_console("crds", "--dir", str(tmp_path / "a"), "--from", str(source), "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["fetched"]) == len(PUBLISHED_CRDS) and missing_crds(tmp_path / "a") == []
    again = run_console("crds", "--dir", str(tmp_path / "a"), "--from", str(source), "--json")
    assert json.loads(again.stdout)["fetched"] == [] and again.returncode == 0

    mirror = tmp_path / "mirror"
    shutil.copytree(source, mirror)
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_console("crds", "--dir", str(tmp_path / "b"), "--from", f"http://127.0.0.1:{port}/")
        assert done.returncode == 0, done.stderr
        assert missing_crds(tmp_path / "b") == []
        tampered = PUBLISHED_CRDS[3].file
        (mirror / tampered).write_bytes((mirror / tampered).read_bytes() + b"\n# changed\n")
        res = run_console("crds", "--dir", str(tmp_path / "c"), "--from", f"http://127.0.0.1:{port}/")
        assert_user_error(res, 3, tampered, "sha256")
        assert not (tmp_path / "c" / tampered).exists()
        assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no partial file left
    finally:
        server.shutdown()


def test_the_runtime_api_is_fenced_by_a_network_policy_and_the_guard_middleware():
    """With the adapter store's runtime LoRA API on, a default-deny ingress NetworkPolicy admits only the Jobs, the
    endpoint picker, the Gateway's proxy pods (by namespace and labels) and Prometheus's namespace (by a namespace
    selector, never pods of any namespace); and every server imports the guard middleware, the very file of the
    package, from its ConfigMap."""
    from importlib import resources

    files = variant_files("fleet")
    policy = files["networkpolicy.yaml"]["spec"]
    (rule,) = policy["ingress"]
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": {"lora-deploy/client": "true"}}} in peers
    assert any(
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "endpoint-picker"
        for p in peers
    )
    gateway = next(
        p for p in peers if "gateway.networking.k8s.io/gateway-name" in p.get("podSelector", {}).get("matchLabels", {})
    )
    assert gateway["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "llm"}}
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in peers
    assert all(p.get("namespaceSelector") != {} for p in peers)  # no "any namespace"
    assert policy["policyTypes"] == ["Ingress"] and rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    server = _server(files)["containers"][0]
    args, env = server["args"], {e["name"]: e.get("value") for e in server["env"]}
    assert args[args.index("--middleware") + 1] == "lora_deploy_guard.ApiKeyGuard"
    assert env["PYTHONPATH"] == "/etc/lora-deploy" and env["LORA_DEPLOY_SERVED_NAMES"] == "base"
    guard = resources.files("lora_deploy").joinpath("serve/guard.py").read_text()
    assert files["configmap.yaml"]["data"]["lora_deploy_guard.py"] == guard
    open_spec = spec_files({**DYNAMIC})  # no key, no runtime API: no guard, no policy
    assert (
        "networkpolicy.yaml" not in open_spec
        and "--middleware" not in open_spec["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    )
