"""The ConfigMap the pods read (the expected models, the readiness script, the smoke test's own code) and the
in-cluster smoke Job that checks the rollout with exactly what `lora-deploy smoke` checks."""

from __future__ import annotations

import json
from importlib import resources

from lora_deploy.k8s.objects import (
    CONFIG_DIR,
    PORT,
    SMOKE_DIR,
    container_security,
    object_labels,
    object_meta,
    pod_spec,
    secret_env,
)
from lora_deploy.k8s.spec import DeploySpec
from lora_deploy.k8s.workload import GUARD_FILE, pods_service_name, store_volume
from lora_deploy.serve.flags import ServedAdapter

READY_SCRIPT = '''\
"""Readiness: the engine is up AND /v1/models lists every expected model (not just /health)."""
import json, os, sys, urllib.request
config = os.environ.get("LORA_DEPLOY_CONFIG_DIR", "/etc/lora-deploy")
want = json.load(open(os.path.join(config, "models.json")))
key = os.environ.get("VLLM_API_KEY")
url = os.environ.get("LORA_DEPLOY_READY_URL", "http://127.0.0.1:8000")
req = urllib.request.Request(url + "/v1/models",
                             headers={"Authorization": "Bearer " + key} if key else {})
try:
    listed = {m["id"] for m in json.load(urllib.request.urlopen(req, timeout=2))["data"]}
except Exception as e:
    sys.exit(f"not ready: {e}")
missing = [m for m in want if m not in listed]
sys.exit(f"not ready: missing {missing}" if missing else 0)
'''


SMOKE_JOB_SCRIPT = '''\
"""In-cluster smoke test: lora-deploy's own smoke module, run against every server pod after rollout.

The Service answers from one pod at a time, so the check runs against each pod the headless Service resolves to,
with the startup adapters and every adapter in the store: one replica that cannot serve an adapter fails the Job.
"""
import json, os, socket, sys, time
import requests
from lora_deploy.serve.smoke import format_report, run_smoke

cfg = json.load(open(os.path.join(os.environ.get("LORA_DEPLOY_CONFIG_DIR", "/etc/lora-deploy"), "smoke.json")))
key = os.environ.get("VLLM_API_KEY")
headers = {"Authorization": "Bearer " + key} if key else {}
deadline = time.monotonic() + cfg["wait_seconds"]


def pods():
    try:
        found = socket.getaddrinfo(cfg["pods_host"], cfg["port"], proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return []
    return sorted({f[4][0] for f in found})


while True:  # wait for the rollout: every expected replica ready (the headless name lists ready pods only)
    addresses = pods()
    if addresses and len(addresses) >= cfg["replicas"]:
        break
    if time.monotonic() > deadline:
        sys.exit(f"{cfg['pods_host']}: {len(addresses)} ready server pod(s), expected {cfg['replicas']}, after "
                 f"{cfg['wait_seconds']} s")
    time.sleep(10)
models = list(cfg["models"])
store = cfg.get("store")
stored = sorted(d for d in os.listdir(store) if not d.startswith(".")
                and os.path.isfile(os.path.join(store, d, "adapter_config.json"))) if store else []
models += [s for s in stored if s not in models]
failures = 0
for address in addresses:
    url = f"http://[{address}]:{cfg['port']}" if ":" in address else f"http://{address}:{cfg['port']}"
    print(f"== replica {url}", flush=True)
    for name in stored:  # one request each, so vLLM's resolver loads it and /v1/models lists it
        r = requests.post(url + "/v1/completions", headers=headers, timeout=600,
                          json={"model": name, "prompt": cfg["prompt"], "max_tokens": 1})
        if r.status_code != 200:
            print(f"store adapter {name}: HTTP {r.status_code} {r.text[:300]}", flush=True)
            failures += 1
    report = run_smoke(url, models=models, base_model=cfg["base_model"], api_key=key, prompt=cfg["prompt"],
                       max_tokens=cfg["max_tokens"])
    print(format_report(report), flush=True)
    failures += not report.passed
sys.exit(1 if failures else 0)
'''


# The modules the smoke Job mounts from the ConfigMap: the smoke test and all it imports (no torch, only requests)
SMOKE_MODULES = ("errors.py", "prompts.py", "serve/__init__.py", "serve/client.py", "serve/smoke.py")


def _module_key(path: str) -> str:
    """The ConfigMap key of a package file (keys may not hold '/'): lora_deploy.serve.client.py."""
    return "lora_deploy." + path.replace("/", ".")


def config_map(spec: DeploySpec, adapters: tuple[ServedAdapter, ...]) -> dict:
    models = [spec.base_name] + [a.name for a in adapters]
    smoke = {
        "pods_host": f"{pods_service_name(spec)}.{spec.namespace}.svc",
        "port": PORT,
        "models": models,
        "replicas": spec.autoscaling.min_replicas if spec.autoscaling.enabled else max(spec.replicas, 1),
        "store": spec.adapter_store.mount_path if spec.adapter_store else None,
        "base_model": spec.base_name,
        "prompt": spec.smoke_test.prompt,
        "max_tokens": spec.smoke_test.max_tokens,
        "wait_seconds": 3600,
    }
    pkg = resources.files("lora_deploy")
    data = {
        "models.json": json.dumps(models) + "\n",
        "adapters.json": json.dumps([{"name": a.name, "path": a.path, "rank": a.rank} for a in adapters], indent=2)
        + "\n",
        "ready.py": READY_SCRIPT,
        "smoke.json": json.dumps(smoke, indent=2) + "\n",
        "smoke_job.py": SMOKE_JOB_SCRIPT,
        # the smoke test's own code, so the Job checks exactly what `lora-deploy smoke` checks
        "lora_deploy__init__.py": '"""lora-deploy smoke test (mounted by the smoke Job)."""\n',
        **{_module_key(m): pkg.joinpath(m).read_text() for m in SMOKE_MODULES},
    }
    if spec.api_key_secret or spec.runtime_api:  # the servers import it from the config mount (--middleware)
        data[GUARD_FILE] = pkg.joinpath("serve/guard.py").read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": object_meta(spec, f"{spec.name}-config"), "data": data}


def smoke_job(spec: DeploySpec) -> dict:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONPATH", "value": SMOKE_DIR}]
    if spec.api_key_secret:
        env.append(secret_env("VLLM_API_KEY", spec.api_key_secret.name, spec.api_key_secret.key))
    items = [
        {"key": "smoke_job.py", "path": "smoke_job.py"},
        {"key": "lora_deploy__init__.py", "path": "lora_deploy/__init__.py"},
        *({"key": _module_key(m), "path": f"lora_deploy/{m}"} for m in SMOKE_MODULES),
    ]
    container: dict = {
        "name": "smoke-test",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", f"{SMOKE_DIR}/smoke_job.py"],
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [
            {"name": "smoke", "mountPath": SMOKE_DIR, "readOnly": True},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security(),
    }
    store_volumes, store_mounts = store_volume(spec)
    container["volumeMounts"] += store_mounts
    volumes = [
        {"name": "smoke", "configMap": {"name": f"{spec.name}-config", "items": items}},
        {"name": "config", "configMap": {"name": f"{spec.name}-config"}},
        {"name": "tmp", "emptyDir": {}},
        *store_volumes,
    ]
    pod = pod_spec(spec, [container], volumes, restart="Never", grace=10)
    pod.pop("nodeSelector", None)
    pod.pop("tolerations", None)  # the check needs no GPU node
    labels = {**object_labels(spec, "smoke-test"), "lora-deploy/client": "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(spec, f"{spec.name}-smoke-test", "smoke-test"),
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": 4200,
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


PUBLISH_SOURCES = "/sources"


def publish_job(spec: DeploySpec) -> dict:
    """A Job template that publishes one adapter into the store from inside the cluster (no local mount needed):
    ``lora-deploy adapters publish`` with the store mounted read-write, the same checks as on a laptop.

    A template, not part of the kustomization: set ``ADAPTER_SOURCE`` (a hub id, an ``s3://BUCKET/PREFIX`` read
    with ``adapterStore.sourceSecret``'s keys or ``sourceServiceAccount``'s role, or a folder under /sources on
    ``adapterStore.sourceClaim``) and ``ADAPTER_NAME``, then ``kubectl create -f publish-job.yaml`` (a new Job each
    time: ``generateName``). Add ``--replace`` to the arguments to publish a new version of an existing name.
    """
    from lora_deploy.k8s.workload import model_path

    store = spec.adapter_store
    assert store is not None and store.publish_image is not None
    model = model_path(spec)
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "ADAPTER_SOURCE", "value": "REPLACE-ME (a hub id, s3://BUCKET/PREFIX, or /sources/<folder>)"},
        {"name": "ADAPTER_NAME", "value": "REPLACE-ME"},
    ]
    if spec.weights.hf_token_secret:
        env.append(secret_env("HF_TOKEN", spec.weights.hf_token_secret, "HF_TOKEN"))
    if spec.api_key_secret:  # to tell every replica of a --replace (a store needs the key: spec validation)
        env.append(secret_env("VLLM_API_KEY", spec.api_key_secret.name, spec.api_key_secret.key))
    volumes, mounts = store_volume(spec, read_only=False)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    if spec.weights.source != "hub":  # pre-flight reads the base's config and headers where the servers read them
        claim = spec.weights.claim or f"{spec.name}-models"
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": spec.weights.mount_path, "readOnly": True})
    if store.source_claim:
        volumes.append(
            {"name": "sources", "persistentVolumeClaim": {"claimName": store.source_claim, "readOnly": True}}
        )
        mounts.append({"name": "sources", "mountPath": PUBLISH_SOURCES, "readOnly": True})
    container = {
        "name": "publish",
        "image": store.publish_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["lora-deploy", "adapters", "publish"],
        "args": [
            "$(ADAPTER_SOURCE)",
            "--name",
            "$(ADAPTER_NAME)",
            "--store",
            store.mount_path,
            "--base",
            model,
            "--model",
            model,
            "--served-model-name",
            spec.base_name,
            "--max-lora-rank",
            str(store.max_lora_rank),
            "--served-from",
            store.mount_path,
            # every ready server pod of the rollout: a --replace reloads each one that holds the adapter
            "--replicas",
            f"{pods_service_name(spec)}.{spec.namespace}.svc:{PORT}",
            "--api-key-env",
            "VLLM_API_KEY",
            "--json",
        ],
        "env": env,
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security(),
    }
    if store.source_secret:  # object-store credentials by reference: the keys stay in the Secret
        container["envFrom"] = [{"secretRef": {"name": store.source_secret}}]
    pod = pod_spec(spec, [container], volumes, restart="Never", grace=30)
    pod.pop("nodeSelector", None)
    pod.pop("tolerations", None)  # no GPU needed
    if store.source_service_account:  # IRSA / workload identity: the pod's role reads the bucket
        pod["serviceAccountName"] = store.source_service_account
    meta = object_meta(spec, "", "publish")
    del meta["name"]
    meta["generateName"] = f"{spec.name}-publish-"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": {**object_labels(spec, "publish"), "lora-deploy/client": "true"}},
                "spec": pod,
            },
        },
    }
