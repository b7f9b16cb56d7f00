"""The ConfigMap the pods read (the expected models, the readiness script, the smoke test's own code) and the
in-cluster smoke Job that checks the rollout with exactly what `lora-deploy smoke` checks."""

from __future__ import annotations

import json
from importlib import resources

from lora_deploy.k8s.objects import (
    CONFIG_DIR,
    SMOKE_DIR,
    container_security,
    object_labels,
    object_meta,
    pod_spec,
    secret_env,
)
from lora_deploy.k8s.spec import DeploySpec
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
"""In-cluster smoke test: lora-deploy's own smoke module, run against the Service after rollout."""
import json, os, sys, time
import requests
from lora_deploy.serve.smoke import format_report, run_smoke

cfg = json.load(open(os.path.join(os.environ.get("LORA_DEPLOY_CONFIG_DIR", "/etc/lora-deploy"), "smoke.json")))
deadline = time.monotonic() + cfg["wait_seconds"]
while True:  # wait for the rollout: the Service answers once a pod is ready
    try:
        if requests.get(cfg["url"] + "/health", timeout=5).status_code == 200:
            break
    except requests.RequestException:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{cfg['url']} did not become healthy within {cfg['wait_seconds']} s")
    time.sleep(10)
report = run_smoke(cfg["url"], models=cfg["models"], base_model=cfg["base_model"],
                   api_key=os.environ.get("VLLM_API_KEY"), prompt=cfg["prompt"], max_tokens=cfg["max_tokens"])
print(format_report(report), flush=True)
sys.exit(0 if report.passed else 1)
'''


# The modules the smoke Job mounts from the ConfigMap: the smoke test and all it imports (no torch, only requests)
SMOKE_MODULES = ("errors.py", "prompts.py", "serve/__init__.py", "serve/client.py", "serve/smoke.py")


def _module_key(path: str) -> str:
    """The ConfigMap key of a package file (keys may not hold '/'): lora_deploy.serve.client.py."""
    return "lora_deploy." + path.replace("/", ".")


def config_map(spec: DeploySpec, adapters: tuple[ServedAdapter, ...]) -> dict:
    models = [spec.base_name] + [a.name for a in adapters]
    url = f"http://{spec.name}.{spec.namespace}.svc:{spec.service.port}"
    smoke = {"url": url, "models": models, "base_model": spec.base_name, "prompt": spec.smoke_test.prompt,
             "max_tokens": spec.smoke_test.max_tokens, "wait_seconds": 3600}
    pkg = resources.files("lora_deploy")
    data = {
        "models.json": json.dumps(models) + "\n",
        "adapters.json": json.dumps([{"name": a.name, "path": a.path, "rank": a.rank} for a in adapters],
                                    indent=2) + "\n",
        "ready.py": READY_SCRIPT,
        "smoke.json": json.dumps(smoke, indent=2) + "\n",
        "smoke_job.py": SMOKE_JOB_SCRIPT,
        # the smoke test's own code, so the Job checks exactly what `lora-deploy smoke` checks
        "lora_deploy__init__.py": '"""lora-deploy smoke test (mounted by the smoke Job)."""\n',
        **{_module_key(m): pkg.joinpath(m).read_text() for m in SMOKE_MODULES},
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": object_meta(spec, f"{spec.name}-config"), "data": data}


def smoke_job(spec: DeploySpec) -> dict:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONPATH", "value": SMOKE_DIR}]
    if spec.api_key_secret:
        env.append(secret_env("VLLM_API_KEY", spec.api_key_secret.name, spec.api_key_secret.key))
    items = [{"key": "smoke_job.py", "path": "smoke_job.py"},
             {"key": "lora_deploy__init__.py", "path": "lora_deploy/__init__.py"},
             *({"key": _module_key(m), "path": f"lora_deploy/{m}"} for m in SMOKE_MODULES)]
    container = {"name": "smoke-test", "image": spec.image, "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", f"{SMOKE_DIR}/smoke_job.py"], "env": env,
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
                 "volumeMounts": [{"name": "smoke", "mountPath": SMOKE_DIR, "readOnly": True},
                                  {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                  {"name": "tmp", "mountPath": "/tmp"}],
                 "securityContext": container_security()}
    volumes = [{"name": "smoke", "configMap": {"name": f"{spec.name}-config", "items": items}},
               {"name": "config", "configMap": {"name": f"{spec.name}-config"}}, {"name": "tmp", "emptyDir": {}}]
    pod = pod_spec(spec, [container], volumes, restart="Never", grace=10)
    pod.pop("nodeSelector", None)
    pod.pop("tolerations", None)  # the check needs no GPU node
    labels = {**object_labels(spec, "smoke-test"), "lora-deploy/client": "true"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": object_meta(spec, f"{spec.name}-smoke-test", "smoke-test"),
            "spec": {"backoffLimit": 1, "activeDeadlineSeconds": 4200, "ttlSecondsAfterFinished": 86400,
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}
