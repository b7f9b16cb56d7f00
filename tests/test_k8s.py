"""Deploy specs and rendered manifests: real Kubernetes schemas, hardening on every pod, committed examples."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import yaml

from helpers import published_crds, run_cli
from k8s_cases import (
    BASE,
    DYNAMIC,
    EXAMPLES,
    KEDA_MISTAKES,
    LWS_MISTAKES,
    ROOT,
    VARIANTS,
    mutated,
    spec_files,
    variant_files,
)
from lora_deploy.errors import InputError
from lora_deploy.k8s.render import compare_with, lws_name, render_manifests
from lora_deploy.k8s.spec import load_spec, parse_spec
from lora_deploy.k8s.validate import KUBERNETES_VERSION, load_crds, validate_object
from lora_deploy.serve.flags import ServeConfig, ServedAdapter, build_vllm_args

# the kinds lora-deploy renders that hold no pod template; any other kind must be one _pod_templates knows
NO_POD_KINDS = {
    "ConfigMap",
    "Service",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "NetworkPolicy",
    "ScaledObject",
    "HorizontalPodAutoscaler",
    "InferencePool",
    "HTTPRoute",
    "PodMonitor",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Kustomization",
}


def _pod_templates(obj: dict) -> list[dict]:
    """Every pod template of a rendered object; a kind that is neither a known workload nor a known pod-less kind
    fails, so a new workload kind cannot slip past the hardening checks unchecked."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job"):
        return [spec["template"]]
    if obj["kind"] == "LeaderWorkerSet":
        t = spec["leaderWorkerTemplate"]
        return [t["leaderTemplate"], t["workerTemplate"]]
    assert obj["kind"] in NO_POD_KINDS, f"{obj['kind']}: a kind the hardening test does not know"
    return []


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_object_passes_the_kubernetes_schemas(name):
    files = variant_files(name)
    for fname, obj in files.items():
        assert validate_object(obj) == [], fname
    templates = {"publish-job.yaml"}  # created per adapter with kubectl create, not applied with the base
    assert files["kustomization.yaml"]["resources"] == [f for f in files if f not in templates | {"kustomization.yaml"}]


def test_the_validator_is_not_a_rubber_stamp():
    dep = variant_files("merged-1gpu")["deployment.yaml"]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = ["48Gi"]
    assert validate_object(bad)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["probe"] = {}  # misspelt field: strict mode refuses it
    assert validate_object(bad)


@pytest.mark.parametrize(
    "variant,fname,path,value,needle",
    [("multinode", "leaderworkerset.yaml", *m) for m in LWS_MISTAKES]
    + [("merged-download-keda", "scaledobject.yaml", *m) for m in KEDA_MISTAKES],
)
def test_custom_resources_are_refused_where_their_api_refuses_them(variant, fname, path, value, needle):
    obj = variant_files(variant)[fname]
    assert validate_object(obj) == []
    problems = validate_object(mutated(obj, path, value))
    assert any(needle in p for p in problems), problems


def _lws_crd(startup_policies: tuple[str, ...] | None = None) -> dict:
    """LeaderWorkerSet's published CRD (../shared/crds), optionally with another startupPolicy enum (an older or
    newer cluster)."""
    crd = yaml.safe_load((published_crds() / "leaderworkerset.x-k8s.io_leaderworkersets.yaml").read_text())
    if startup_policies is not None:
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        spec["startupPolicy"]["enum"] = list(startup_policies)
    return crd


def test_a_supplied_crd_replaces_the_built_in_check(tmp_path):
    """`kubectl get crd -o yaml` output (a List) and release bundles (several documents) both load; the
    object is then held to that CRD, strictly, and its OpenAPI extensions mean what Kubernetes says."""
    listed = tmp_path / "crds.yaml"
    listed.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [_lws_crd()]}))
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}, _lws_crd()])
    )
    for path in (listed, bundle):
        crds = load_crds([path])
        assert list(crds) == [("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")]
    lws = variant_files("multinode")["leaderworkerset.yaml"]
    assert validate_object(lws, crds=crds) == []
    rolling = "spec.rolloutStrategy.rollingUpdateConfiguration"
    assert validate_object(mutated(lws, f"{rolling}.maxSurge", "25%"), crds=crds) == []  # int-or-string
    for path, value, needle in [
        (f"{rolling}.maxSurge", True, "is not valid under any of the given schemas"),
        ("spec.leaderWorkerTemplate.sise", 2, "'sise' was unexpected"),
        ("spec.replicas", "1", "'1' is not of type 'integer'"),
        # the CRD replaces only the schema: pod templates still meet the core
        # schema, and the LWS webhook's rule still holds
        ("spec.leaderWorkerTemplate.workerTemplate.spec.containers.0.env", "x", "workerTemplate"),
        (f"{rolling}.maxUnavailable", 0, "cannot both be 0"),
    ]:
        problems = validate_object(mutated(lws, path, value), crds=crds)
        assert any(needle in p for p in problems), (path, problems)


def test_manifests_cli_holds_custom_resources_to_the_given_crd(tmp_path):
    spec = ROOT / "deploy" / "llama-70b-multinode.yaml"
    crd = tmp_path / "lws-crd.yaml"
    crd.write_text(yaml.safe_dump(_lws_crd()))
    rc, stdout, stderr = run_cli("manifests", str(spec), "--output", str(tmp_path / "ok"), "--crd", str(crd), "--json")
    assert rc == 0, stderr
    assert json.loads(stdout)["validated_against"]["leaderworkerset"] == f"leaderworkerset.x-k8s.io/v1 CRD from {crd}"
    crd.write_text(yaml.safe_dump(_lws_crd(startup_policies=("LeaderReady",))))  # a cluster without LeaderCreated
    rc, _, stderr = run_cli("manifests", str(spec), "--output", str(tmp_path / "old"), "--crd", str(crd))
    assert rc == 3 and "spec.startupPolicy" in stderr and not (tmp_path / "old").exists()
    (tmp_path / "none.yaml").write_text("kind: ConfigMap\napiVersion: v1\n")
    rc, _, stderr = run_cli(
        "manifests", str(spec), "--output", str(tmp_path / "x"), "--crd", str(tmp_path / "none.yaml")
    )
    assert rc == 3 and "no CustomResourceDefinition" in stderr and "kubectl get crd" in stderr


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hardening_on_every_pod_template(name):
    """Every pod the manifests start (servers, workers, the endpoint picker, the smoke and publish Jobs) is hardened;
    the check saw at least the server's pod template of every variant."""
    files = variant_files(name)
    assert any(_pod_templates(obj) for obj in files.values()), sorted(files)
    for obj in files.values():
        for tmpl in _pod_templates(obj):
            pod = tmpl["spec"]
            picker = tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == "endpoint-picker"
            # only the endpoint picker talks to the API server (it watches pods and its pool), with its own account
            assert pod.get("automountServiceAccountToken", True) is picker and pod["enableServiceLinks"] is False
            assert picker == ("serviceAccountName" in pod)
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 2000
                assert ":" in c["image"] and not c["image"].endswith(":latest")
                assert c.get("command", ["image entrypoint"])[0] not in ("sh", "bash", "/bin/sh", "/bin/bash")
                for e in c.get("env", []):  # secrets only by reference
                    if e["name"] in ("HF_TOKEN", "VLLM_API_KEY"):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"]
                res = c["resources"]
                assert res["requests"]["memory"] == res["limits"]["memory"]
                for k, v in res["limits"].items():
                    if k.endswith("/gpu"):
                        assert res["requests"][k] == v
            if tmpl is _pod_templates(obj)[0] and obj["kind"] != "Job" and not picker:
                server = pod["containers"][0]
                assert server["command"] == ["vllm", "serve"]
                shm = next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]
                assert shm["medium"] == "Memory"
                assert server["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
                assert pod["terminationGracePeriodSeconds"] >= 60


def test_probes_fit_weight_loading_and_check_adapters():
    pvc = variant_files("dynamic-1gpu")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    dl = variant_files("merged-download-keda")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert pvc["startupProbe"]["failureThreshold"] * pvc["startupProbe"]["periodSeconds"] == 600
    assert dl["startupProbe"]["failureThreshold"] * dl["startupProbe"]["periodSeconds"] == 1800
    assert pvc["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pvc["readinessProbe"]["exec"]["command"] == ["python3", "/etc/lora-deploy/ready.py"]
    models = json.loads(variant_files("dynamic-1gpu")["configmap.yaml"]["data"]["models.json"])
    assert models == ["base", "a1", "a2"]


def test_dynamic_flags_are_the_launchers_flags():
    """The manifests and `lora-deploy dynamic` share one derivation of every LoRA flag."""
    spec = parse_spec(copy.deepcopy(DYNAMIC))
    args = variant_files("dynamic-1gpu")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    adapters = (ServedAdapter("a1", "/models/adapters/a1", 16), ServedAdapter("a2", "/models/adapters/a2", 40))
    launcher, _, _ = build_vllm_args(
        ServeConfig(
            model=spec.model,
            served_model_name="base",
            adapters=adapters,
            host="0.0.0.0",
            port=8000,
            seed=None,
        ),
        cpu_build=False,
    )
    assert args == ["/models/base"] + launcher
    assert args[args.index("--max-lora-rank") + 1] == "64" and args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--max-cpu-loras") + 1] == "2"
    assert [json.loads(a)["name"] for a in args if a.startswith("{")] == ["a1", "a2"]
    merged = variant_files("merged-1gpu")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in merged if "lora" in a]


def test_multi_gpu_sets_parallelism_shm_and_gpus():
    dep = variant_files("dynamic-4gpu")["deployment.yaml"]
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4" and "--fully-sharded-loras" in args
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"] == "16Gi"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_multi_node_is_a_leader_worker_set():
    files = variant_files("multinode-dynamic")
    assert "deployment.yaml" not in files
    lws = files["leaderworkerset.yaml"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    assert tmpl["size"] == 3
    leader = tmpl["leaderTemplate"]["spec"]["containers"][0]["args"]
    worker = tmpl["workerTemplate"]["spec"]["containers"][0]["args"]
    assert "--headless" in worker and "--headless" not in leader
    assert leader[leader.index("--node-rank") + 1] == "0"
    assert worker[worker.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
    assert leader[leader.index("--pipeline-parallel-size") + 1] == "3"
    assert files["service.yaml"]["spec"]["selector"]["role"] == "leader"


@pytest.mark.parametrize("name", ["multinode", "multinode-dynamic"])
def test_multi_node_leaves_lws_its_headless_service_and_protects_whole_groups(name):
    """LWS names its headless Service (the leader address workers dial) after itself and skips creating it
    when that name is taken; a drain must not evict pods of several groups at once."""
    files = variant_files(name)
    lws = files["leaderworkerset.yaml"]
    assert lws["metadata"]["name"] == lws_name(parse_spec(copy.deepcopy(VARIANTS[name])))
    services = [o["metadata"]["name"] for o in files.values() if o["kind"] == "Service"]
    assert lws["metadata"]["name"] not in services and services == ["bot", "bot-pods"]
    selector = files["pdb.yaml"]["spec"]["selector"]["matchLabels"]
    for role in ("leaderTemplate", "workerTemplate"):
        labels = lws["spec"]["leaderWorkerTemplate"][role]["metadata"]["labels"]
        assert selector.items() <= labels.items(), role
    assert files["pdb.yaml"]["spec"]["maxUnavailable"] == 1


def test_the_weights_claim_is_shared_whenever_more_than_one_pod_mounts_it():
    """One pod may use a node-local volume; several replicas, or one group spread over nodes, cannot."""
    one = {**BASE, "model": "org/model", "weights": {"source": "download"}}
    assert spec_files(one)["pvc.yaml"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec_files({**one, "replicas": 2})["pvc.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]
    group = spec_files({**one, "gpus": 8, "multiNode": {"nodes": 2}})  # one replica, two nodes
    assert "leaderworkerset.yaml" in group and group["pvc.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_runtime_adapters_need_a_key_and_get_a_network_policy():
    files = variant_files("dynamic-runtime-hpa")
    env = {e["name"]: e for e in files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "key", "key": "api-key"}
    np = files["networkpolicy.yaml"]
    assert np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"lora-deploy/client": "true"}
    job_labels = files["smoke-test-job.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert job_labels["lora-deploy/client"] == "true"  # the smoke test may pass the policy
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {
        e["name"]
        for e in variant_files("dynamic-1gpu")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    with pytest.raises(InputError, match="needs apiKeySecret"):
        parse_spec({**DYNAMIC, "runtimeAdapters": True})


def test_autoscaling_on_the_queue_metric():
    keda = variant_files("merged-download-keda")["scaledobject.yaml"]
    assert "vllm:num_requests_waiting" in keda["spec"]["triggers"][0]["metadata"]["query"]
    hpa = variant_files("dynamic-runtime-hpa")
    assert hpa["hpa.yaml"]["spec"]["metrics"][0]["external"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert "replicas" not in hpa["deployment.yaml"]["spec"]  # the autoscaler owns it


def test_smoke_job_runs_the_smoke_module_with_images_already_in_use():
    files = variant_files("dynamic-1gpu")
    job = files["smoke-test-job.yaml"]
    images = {c["image"] for c in files["deployment.yaml"]["spec"]["template"]["spec"]["containers"]}
    assert {c["image"] for c in job["spec"]["template"]["spec"]["containers"]} <= images
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_smoke_jobs_mounted_code_imports_alone_without_torch(tmp_path):
    """The smoke Job runs the ConfigMap's copy of lora-deploy's modules in the vLLM image: mounted as the Job
    mounts them, they import with nothing but requests (the installed lora_deploy shadowed, torch and transformers
    unavailable), so a module that grows an import the ConfigMap does not ship fails here, not in the cluster.
    (tests/test_vllm_server.py runs the same Job code against real vLLM.)"""
    import subprocess
    import sys

    files = variant_files("dynamic-1gpu")
    data = files["configmap.yaml"]["data"]
    job = files["smoke-test-job.yaml"]["spec"]["template"]["spec"]
    for item in job["volumes"][0]["configMap"]["items"]:
        (tmp_path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / item["path"]).write_text(data[item["key"]])
    code = (
        "import sys; sys.modules.update(torch=None, transformers=None, peft=None, safetensors=None); "
        f"sys.path.insert(0, {str(tmp_path)!r}); import lora_deploy.serve.smoke, lora_deploy.serve.client; "
        f"assert lora_deploy.serve.smoke.__file__.startswith({str(tmp_path)!r}), lora_deploy.serve.smoke.__file__"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "data,needle",
    [
        ({**BASE, "replcas": 2}, "replcas: unknown key"),
        ({**BASE, "gpus": "two"}, "gpus: expected a whole number"),
        ({**BASE, "name": "Support_Bot"}, "name: 'Support_Bot' is not a DNS-1123 name"),
        ({**BASE, "mode": "merged", "adapters": [{"name": "a", "path": "/a"}]}, "merged deployment"),
        ({**BASE, "mode": "sideways"}, "mode: 'sideways'"),
        ({**BASE, "image": "vllm/vllm-openai:latest"}, "is not pinned"),
        ({**BASE, "weights": {"source": "ftp"}}, "weights.source"),
        (
            {**DYNAMIC, "adapters": [{"name": "a1", "path": "/x", "rank": 8, "alpha": 3}]},
            "adapters[0].alpha: unknown key",
        ),
        ({"name": "x"}, "missing required key(s): model"),
        ({**BASE, "resources": {"memory": "lots"}}, "not a Kubernetes quantity"),
    ],
)
def test_spec_errors_name_the_yaml_path(data, needle):
    with pytest.raises(InputError) as err:
        parse_spec(data)
    assert needle in err.value.message


def test_dynamic_rank_is_read_from_a_local_adapter(example):
    spec = parse_spec(
        {**BASE, "mode": "dynamic", "adapters": [{"name": "reply", "path": str(example.adapters["reply"])}]}
    )
    args = render_manifests(spec).files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "16"
    with pytest.raises(InputError, match="give|rank"):
        render_manifests(parse_spec({**BASE, "mode": "dynamic", "adapters": [{"name": "x", "path": "/nowhere"}]}))


@pytest.mark.parametrize("spec_file", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_committed_manifests_match_a_fresh_render(spec_file):
    """manifests/NAME is what `lora-deploy manifests deploy/NAME.yaml` renders today."""
    rendered = render_manifests(load_spec(spec_file))
    diffs = compare_with(rendered, ROOT / "manifests" / spec_file.stem)
    assert diffs == [], f"re-render: lora-deploy manifests {spec_file.relative_to(ROOT)} --force"


@pytest.mark.parametrize("spec_file", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_committed_manifests_have_no_yaml_aliases(spec_file):
    """Every file reads on its own: no &anchor / *alias shared between containers."""
    for path in sorted((ROOT / "manifests" / spec_file.stem).glob("*.yaml")):
        events = list(yaml.parse(path.read_text()))
        assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events), path.name


def test_examples_cover_both_modes():
    modes = {load_spec(p).mode for p in EXAMPLES}
    assert modes == {"merged", "dynamic"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("spec_file", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_kustomize_builds_every_committed_base(spec_file):
    folder = ROOT / "manifests" / spec_file.stem
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout)]
    listed = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    assert len(kinds) == len(listed) and "Service" in kinds and "Job" in kinds


def test_manifests_cli_writes_checks_and_refuses_to_overwrite(tmp_path):
    rc, stdout, _ = run_cli("manifests", "--help")
    assert rc == 0 and "manifests/NAME" in stdout  # help is markdown: <placeholders> would vanish
    spec = ROOT / "deploy" / "support-bot-merged.yaml"
    out = tmp_path / "m"
    rc, stdout, stderr = run_cli("manifests", str(spec), "--output", str(out), "--json")
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["kubernetes"] == KUBERNETES_VERSION and (out / "deployment.yaml").is_file()
    assert report["validated_against"]["keda"].startswith("2.")
    assert run_cli("manifests", str(spec), "--output", str(out), "--check")[0] == 0
    (out / "service.yaml").write_text("changed")
    rc, stdout, _ = run_cli("manifests", str(spec), "--output", str(out), "--check")
    assert rc == 6 and "service.yaml" in stdout  # out of date: a check that failed
    rc, _, stderr = run_cli("manifests", str(spec), "--output", str(out))
    assert rc == 5 and "--force" in stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: /m\nreplcas: 3\n")
    rc, _, stderr = run_cli("manifests", str(bad), "--output", str(tmp_path / "b"))
    assert rc == 3 and "replcas: unknown key" in stderr and not (tmp_path / "b").exists()


def test_merged_and_dynamic_write_manifests_for_what_they_do(example, tmp_path):
    rc, _, stderr = run_cli(
        "merged",
        "--base",
        str(example.base),
        "--adapter",
        str(example.adapters["classify"]),
        "--output",
        str(tmp_path / "merged"),
        "--manifests",
        str(tmp_path / "k8s-merged"),
    )
    assert rc == 0, stderr
    dep = yaml.safe_load((tmp_path / "k8s-merged" / "deployment.yaml").read_text())
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][0] == "/models/merged"
    rc, _, stderr = run_cli(
        "dynamic",
        "--base",
        str(example.base),
        "--adapter",
        f"classify={example.adapters['classify']}",
        "--adapter",
        f"reply={example.adapters['reply']}",
        "--dry-run",
        "--manifests",
        str(tmp_path / "k8s-dyn"),
    )
    assert rc == 0, stderr
    args = yaml.safe_load((tmp_path / "k8s-dyn" / "deployment.yaml").read_text())["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "16"  # read from the real adapters
    assert [json.loads(a)["name"] for a in args if a.startswith("{")] == ["classify", "reply"]


def test_spec_errors_come_all_at_once_with_the_closest_key():
    """Two misspelt keys and a bad value: one run names all three, with 'did you mean' for the keys."""
    data = {**BASE, "replica": 2, "gpus": "two", "vllm": {"maxModelLength": 4096}}
    with pytest.raises(InputError) as err:
        parse_spec(data)
    message = err.value.message
    assert message.startswith("3 problems")
    assert "replica: unknown key (did you mean replicas?)" in message
    assert "vllm.maxModelLength: unknown key (did you mean maxModelLen?)" in message
    assert "gpus: expected a whole number" in message


def test_cross_field_spec_errors_come_all_at_once():
    """Rules between keys (DNS names, pinned image, quantities) report every violation in one run too."""
    with pytest.raises(InputError) as err:
        parse_spec({**BASE, "name": "Support_Bot", "image": "vllm/vllm-openai:latest", "resources": {"memory": "lots"}})
    message = err.value.message
    assert message.startswith("3 problems")
    assert "not a DNS-1123 name" in message and "is not pinned" in message and "not a Kubernetes quantity" in message


def test_dynamic_moe_expert_adapters_are_marked_in_the_manifests():
    spec = parse_spec(
        {
            **BASE,
            "mode": "dynamic",
            "adapters": [
                {"name": "experts", "path": "/models/adapters/experts", "rank": 8, "moeExperts": True},
                {"name": "plain", "path": "/models/adapters/plain", "rank": 8},
            ],
        }
    )
    args = render_manifests(spec).files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-mixed-moe-lora-format" in args
    modules = [json.loads(a) for a in args if a.startswith("{")]
    assert [m.get("is_3d_lora_weight", False) for m in modules] == [True, False]


def test_dynamic_manifests_for_a_moe_expert_adapter_keep_its_flag():
    """`dynamic --manifests` writes the spec from pre-flight's verdicts: a MoE expert adapter stays marked even
    though its cluster path (/models/adapters/NAME) cannot be read where the manifests are rendered."""
    from lora_deploy.k8s.spec import spec_for_local_run

    spec = spec_for_local_run(
        served_name="base",
        mode="dynamic",
        model="/models/base",
        local_model=True,
        adapters=(("experts", 8, True), ("plain", 8, False)),
    )
    assert [a.moe_experts for a in spec.adapters] == [True, None]
    args = render_manifests(spec).files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-mixed-moe-lora-format" in args


def test_an_unreadable_adapter_is_rendered_as_plain_lora_and_the_output_says_so(tmp_path):
    """Whether an adapter holds MoE expert LoRA is read from its folder; where the folder is not on this machine
    (the usual case: it is on the cluster's volume) the render says it could not tell, instead of assuming."""
    rendered = render_manifests(parse_spec(copy.deepcopy(DYNAMIC)))
    assert any("a1" in n and "not readable here" in n and "moeExperts" in n for n in rendered.notes), rendered.notes
    told = copy.deepcopy(DYNAMIC)
    for a in told["adapters"]:
        a["moeExperts"] = False
    assert not any("not readable here" in n for n in render_manifests(parse_spec(told)).notes)


def test_api_names_are_the_same_locally_and_in_the_cluster(tmp_path):
    """One naming rule: a base folder `Llama-3` and an adapter `Support_A` keep those names in `dynamic`'s own command
    and in the Deployment rendered for the same deployment (no lower-casing, no DNS mangling); a spec without
    servedModelName serves its model under the same name a local run would; a name outside the rule is refused."""
    from helpers import make_adapter, make_base

    base = make_base(tmp_path / "Llama-3", "llama", tokenizer=True)
    adapter = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    code, out, err = run_cli(
        "dynamic",
        "--base",
        str(base),
        "--adapter",
        f"Support_A={adapter}",
        "--dry-run",
        "--json",
        "--manifests",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    argv = json.loads(out)["argv"]
    local = {argv[argv.index("--served-model-name") + 1]} | {json.loads(a)["name"] for a in argv if a.startswith("{")}
    args = yaml.safe_load((tmp_path / "out" / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]
    cluster = {args[args.index("--served-model-name") + 1]} | {json.loads(a)["name"] for a in args if a.startswith("{")}
    assert local == cluster == {"Llama-3", "Support_A"}, (local, cluster)
    assert parse_spec({**BASE, "model": "/models/Llama-3", "mode": "merged"}).base_name == "Llama-3"
    with pytest.raises(InputError, match="cannot be a model name"):
        parse_spec({**DYNAMIC, "adapters": [{"name": "support a", "path": "/a", "rank": 8}]})
