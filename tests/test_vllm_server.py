"""Real vLLM (the CPU build) on 127.0.0.1, started by lora-deploy's own launcher, queried with `openai`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import free_port, mount_smoke_job, run_cli, scaled_adapter
from helpers import start_cli as _cli
from helpers import wait_for_log as _wait_for
from lora_deploy.errors import EXIT_INPUT
from lora_deploy.examples.tiny import PROMPT_TEMPLATE, TICKETS, greedy_answer
from lora_deploy.serve.flags import ServeConfig, ServedAdapter
from lora_deploy.serve.launcher import VllmServer, group_members, plan_launch
from lora_deploy.serve.settings import EngineSettings

API_KEY_VAR = "LORA_DEPLOY_TEST_KEY"
API_KEY = "test-key-not-secret"
PROMPTS = [PROMPT_TEMPLATE.format(message=ms[0]) for ms in TICKETS.values()]


@pytest.fixture(scope="session")
def server(example, tmp_path_factory):
    """One dynamic server for the session: base + both example adapters, float32, runtime adapters allowed."""
    os.environ[API_KEY_VAR] = API_KEY
    cfg = ServeConfig(
        model=str(example.base),
        served_model_name="support",
        adapters=(
            ServedAdapter("classify", str(example.adapters["classify"]), 8),
            ServedAdapter("reply", str(example.adapters["reply"]), 16),
        ),
        port=free_port(),
        engine=EngineSettings(dtype="float32"),
        allow_runtime_adapters=True,
        api_key_env=API_KEY_VAR,
        runtime_slots=1,
    )  # one slot for the runtime adapter below, besides the CPU build's empty one
    srv = VllmServer(plan_launch(cfg), log_path=tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        srv.start()
        srv.wait_ready(timeout=600)
        yield srv
    finally:
        pgid = srv.pgid
        srv.stop()
        assert group_members(pgid) == [], "vLLM processes survived stop()"


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.plan.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def complete(client, model: str, prompt: str, max_tokens: int = 16) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_models_lists_base_and_adapters_with_parent(client, example):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"support", "classify", "reply"}
    assert models["classify"].parent == "support" and models["reply"].parent == "support"
    assert models["support"].parent is None


@pytest.mark.parametrize("adapter", ["classify", "reply"])
def test_greedy_tokens_equal_transformers_with_peft(client, example, adapter):
    """float32: vLLM's adapter answers are transformers+PEFT's greedy answers, prompt for prompt."""
    for prompt in PROMPTS:
        expected = greedy_answer(example.base, prompt, adapter=example.adapters[adapter], max_new_tokens=16)
        assert complete(client, adapter, prompt) == expected, prompt


def test_base_answers_like_transformers(client, example):
    assert complete(client, "support", PROMPTS[0]) == greedy_answer(example.base, PROMPTS[0])


def test_mixed_concurrent_batch_is_correct(client):
    """Base and adapter requests in one batch get their own answers (the CPU mixed-batch bug is worked around)."""
    solo = {m: complete(client, m, PROMPTS[0]) for m in ("support", "classify", "reply")}
    assert len(set(solo.values())) == 3
    models = ["support", "classify", "reply"] * 3
    for _ in range(3):
        with ThreadPoolExecutor(len(models)) as pool:
            answers = list(pool.map(lambda m: complete(client, m, PROMPTS[0]), models))
        assert answers == [solo[m] for m in models]


def test_chat_completion_uses_the_chat_template(client):
    r = client.chat.completions.create(
        model="classify", messages=[{"role": "user", "content": "I lost my password."}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content.strip() == "account"


def test_smoke_command_passes_and_reports_json(server):
    rc, stdout, stderr = run_cli(
        "smoke",
        "--url",
        server.plan.url,
        "--api-key-env",
        API_KEY_VAR,
        "--json",
        "--model",
        "classify",
        "--model",
        "reply",
    )
    assert rc == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["passed"] and report["base_model"] == "support"
    names = {(c["name"], c["model"]) for c in report["checks"] if c["passed"]}
    assert ("adapter applied", "classify") in names and ("mixed batch = own model", "support") in names
    assert all(m["ttft_s"] > 0 for m in report["models"])


def test_smoke_errors_are_clear(server):
    rc, _, stderr = run_cli("smoke", "--url", server.plan.url)  # no API key
    assert rc == EXIT_INPUT and "401" in stderr and "--api-key-env" in stderr
    rc, stdout, _ = run_cli("smoke", "--url", server.plan.url, "--api-key-env", API_KEY_VAR, "--model", "nope")
    assert rc == 8 and "FAIL  models listed: missing: nope" in stdout
    rc, _, stderr = run_cli("smoke", "--url", f"http://127.0.0.1:{free_port()}")
    assert rc == 8 and "cannot connect" in stderr


def test_runtime_load_and_unload_are_confirmed(server, client, example, tmp_path):
    url = server.plan.url
    rc, stdout, stderr = run_cli(
        "adapters",
        "load",
        "reply2",
        str(example.adapters["reply"]),
        "--url",
        url,
        "--api-key-env",
        API_KEY_VAR,
        "--json",
    )
    assert rc == 0, stderr
    loaded = json.loads(stdout)
    assert loaded["model"]["parent"] == "support" and loaded["preflight"] == "passed"
    assert loaded["distance_to_base"] > 1e-3
    assert complete(client, "reply2", PROMPTS[0]) == complete(client, "reply", PROMPTS[0])
    # the reserved slot is taken: a second runtime load is refused, and the smoke test still passes
    rc, _, stderr = run_cli(
        "adapters", "load", "reply3", str(example.adapters["reply"]), "--url", url, "--api-key-env", API_KEY_VAR
    )
    assert rc == 9 and "reserved for runtime adapters are in use (reply2)" in stderr, stderr
    # --replace swaps the weights behind the name in place (vLLM load_inplace), no slot needed
    rc, stdout, stderr = run_cli(
        "adapters",
        "load",
        "reply2",
        str(example.adapters["classify"]),
        "--url",
        url,
        "--api-key-env",
        API_KEY_VAR,
        "--replace",
        "--json",
    )
    assert rc == 0, stderr
    replaced = json.loads(stdout)
    assert replaced["replaced"] == str(example.adapters["reply"]) and replaced["model"]["root"] == str(
        example.adapters["classify"]
    )
    assert complete(client, "reply2", PROMPTS[0]) == complete(client, "classify", PROMPTS[0])
    # a replacement that answers like the base is refused and the previous weights are put back
    zero = scaled_adapter(example.adapters["reply"], tmp_path / "zero", 0.0)
    rc, _, stderr = run_cli(
        "adapters", "load", "reply2", str(zero), "--url", url, "--api-key-env", API_KEY_VAR, "--replace"
    )
    assert rc == 9 and "put back to" in stderr, stderr
    assert complete(client, "reply2", PROMPTS[0]) == complete(client, "classify", PROMPTS[0])
    rc, _, stderr = run_cli(
        "adapters", "load", "nobody", str(zero), "--url", url, "--api-key-env", API_KEY_VAR, "--replace"
    )
    assert rc == 9 and "serves no adapter named 'nobody'" in stderr, stderr
    rc, stdout, stderr = run_cli("smoke", "--url", url, "--api-key-env", API_KEY_VAR, "--json")
    assert rc == 0, stdout + stderr
    # a startup adapter stays unless forced (the readiness probe requires it)
    rc, _, stderr = run_cli("adapters", "unload", "classify", "--url", url, "--api-key-env", API_KEY_VAR)
    assert rc == 9 and "--force" in stderr
    assert "classify" in {m.id for m in client.models.list().data}
    rc, _, stderr = run_cli("adapters", "unload", "reply2", "--url", url, "--api-key-env", API_KEY_VAR)
    assert rc == 0, stderr
    assert "reply2" not in {m.id for m in client.models.list().data}
    # a path the server cannot read: vLLM's refusal, confirmed by /v1/models
    rc, _, stderr = run_cli(
        "adapters", "load", "ghost", str(tmp_path / "missing"), "--url", url, "--api-key-env", API_KEY_VAR
    )
    assert rc == 9 and "ghost" in stderr
    assert "ghost" not in {m.id for m in client.models.list().data}


def test_a_runtime_adapter_for_another_base_is_refused_before_vllm_sees_it(server, client, tmp_path):
    """Pre-flight against the served base: other hidden size, refused (exit 3), never listed."""
    from helpers import make_adapter, make_base

    other = make_base(tmp_path / "other", "llama", hidden_size=128, intermediate_size=256)
    adapter = make_adapter(other, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    rc, _, stderr = run_cli(
        "adapters", "load", "stranger", str(adapter), "--url", server.plan.url, "--api-key-env", API_KEY_VAR
    )
    assert rc == EXIT_INPUT and "fits the base" in stderr, stderr
    assert "stranger" not in {m.id for m in client.models.list().data}
    rc, _, stderr = run_cli(
        "adapters", "load", "classify", str(adapter), "--url", server.plan.url, "--api-key-env", API_KEY_VAR
    )
    assert rc == 9 and "already serves" in stderr and "--replace" in stderr and "{" not in stderr


def test_merged_serve_matches_dynamic_and_sigterm_leaves_no_process(server, client, example, tmp_path):
    """`merged --serve` in float32 answers exactly like the adapter served dynamically; SIGTERM cleans up."""
    port, log = free_port(), tmp_path / "cli.log"
    proc = _cli(
        "merged",
        "--base",
        str(example.base),
        "--adapter",
        str(example.adapters["classify"]),
        "--output",
        str(tmp_path / "merged"),
        "--dtype",
        "float32",
        "--serve",
        "--serve-dtype",
        "float32",
        "--port",
        str(port),
        "--served-model-name",
        "support-merged",
        log=log,
    )
    try:
        pgid = int(_wait_for(r"process group (\d+)", log, proc).group(1))
        _wait_for(r"Serving at ", log, proc)
        from openai import OpenAI

        merged = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for prompt in PROMPTS:
            assert complete(merged, "support-merged", prompt) == complete(client, "classify", prompt), prompt
        assert group_members(pgid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        deadline = time.monotonic() + 30
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_members(pgid) == [], "vLLM outlived the CLI's SIGTERM"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_vllm_dying_at_start_up_is_a_clear_error(example, tmp_path):
    rc, _, stderr = run_cli(
        "dynamic",
        "--base",
        str(example.base),
        "--adapter",
        f"classify={example.adapters['classify']}",
        "--port",
        str(free_port()),
        "--log",
        str(tmp_path / "vllm.log"),
        "--exit-after-smoke",
        "--",
        "--no-such-flag",
    )
    assert rc == 7, stderr
    assert "vLLM exited during start-up" in stderr and "--no-such-flag" in stderr
    pgid = int(re.search(r"process group (\d+)", stderr).group(1))
    assert group_members(pgid) == []


def test_smoke_catches_mixed_batch_corruption_without_the_workaround(example, tmp_path):
    """With every LoRA slot filled (``--max-loras 2`` for two adapters), the CPU build answers base requests with an
    adapter in mixed batches: the smoke test must fail, which is what the launcher's extra slot prevents.

    The corruption shows only in a batch that mixes base and adapter requests, and whether the server batches a
    burst together depends on timing (on a loaded 2-core machine one run of the default 3 rounds once formed no
    mixed batch and passed). So the same server gets up to 4 smoke runs of 6 rounds each: the claim is that the
    smoke test catches the corruption when it happens, and every failure it reports must be this one."""
    from lora_deploy.serve.settings import LoraSettings
    from lora_deploy.serve.smoke import run_smoke

    cfg = ServeConfig(
        model=str(example.base),
        served_model_name="support",
        engine=EngineSettings(dtype="float32"),
        lora=LoraSettings(max_loras=2),
        port=free_port(),
        adapters=(
            ServedAdapter("classify", str(example.adapters["classify"]), 8),
            ServedAdapter("reply", str(example.adapters["reply"]), 16),
        ),
    )
    srv = VllmServer(plan_launch(cfg), log_path=tmp_path / "server.log")
    reports = []
    try:
        srv.start()
        srv.wait_ready(timeout=600)
        for _ in range(4):
            reports.append(run_smoke(srv.plan.url, base_model="support", rounds=6))
            if not reports[-1].passed:
                break
    finally:
        srv.stop()
    failed = [c for r in reports for c in r.checks if not c.passed]
    # base requests get an adapter's weights: in mixed bursts (closer to that adapter's answers), and alone too
    # when the filled slot is the one a lone base request indexes (then the base equals that adapter)
    assert failed, f"{len(reports)} smoke runs passed with every LoRA slot filled"
    assert {c.name for c in failed} <= {"mixed batch = own model", "adapter applied"}, failed
    assert any("closer to" in c.detail or "equals the base" in c.detail for c in failed), failed


def test_kubernetes_probe_and_smoke_job_scripts_against_real_vllm(server, example, tmp_path):
    """The readiness probe and the smoke-test Job that the manifests ship run for real against vLLM."""
    from lora_deploy.k8s.render import render_manifests
    from lora_deploy.k8s.spec import parse_spec

    spec = parse_spec(
        {
            "name": "support",
            "mode": "dynamic",
            "model": str(example.base),
            "servedModelName": "support",
            "adapters": [
                {"name": "classify", "path": str(example.adapters["classify"])},
                {"name": "reply", "path": str(example.adapters["reply"])},
            ],
            "apiKeySecret": {"name": "k", "key": "api-key"},
        }
    )
    files = render_manifests(spec).files
    config, code, smoke = mount_smoke_job(files, tmp_path)
    assert smoke["pods_host"] == "support-pods.default.svc" and smoke["replicas"] == 1
    smoke.update(pods_host="127.0.0.1", port=server.plan.port, wait_seconds=30)  # the one "pod" here
    (config / "smoke.json").write_text(json.dumps(smoke))
    env = {
        **os.environ,
        "LORA_DEPLOY_CONFIG_DIR": str(config),
        "PYTHONPATH": str(code),
        "LORA_DEPLOY_READY_URL": server.plan.url,
        "VLLM_API_KEY": API_KEY,
    }
    ready = subprocess.run([sys.executable, str(config / "ready.py")], env=env, capture_output=True, text=True)
    assert ready.returncode == 0, ready.stderr
    job = subprocess.run(
        [sys.executable, str(code / "smoke_job.py")], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert "PASSED" in job.stdout and "classify" in job.stdout
    assert f"== replica http://127.0.0.1:{server.plan.port}" in job.stdout
    # a store adapter this replica cannot serve (its vLLM resolves no store) fails the Job
    store = tmp_path / "store"
    shutil.copytree(example.adapters["reply"], store / "late-adapter")
    (config / "smoke.json").write_text(json.dumps({**smoke, "store": str(store)}))
    failing = subprocess.run(
        [sys.executable, str(code / "smoke_job.py")], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "store adapter late-adapter: HTTP 404" in failing.stdout, failing.stdout
    # the probe is not a rubber stamp: an adapter the server does not list keeps the pod unready
    (config / "models.json").write_text(json.dumps(["support", "classify", "missing-adapter"]))
    unready = subprocess.run([sys.executable, str(config / "ready.py")], env=env, capture_output=True, text=True)
    assert unready.returncode != 0 and "missing-adapter" in unready.stderr


def test_smoke_judges_distributions_not_text(example, tmp_path):
    """An applied adapter whose greedy text equals the base's passes (the old text check failed it); an adapter
    with zero lora_B fails; nothing else fails, and the distances are reported."""
    from lora_deploy.serve.smoke import run_smoke

    faint = scaled_adapter(example.adapters["classify"], tmp_path / "faint", 1e-3)
    zero = scaled_adapter(example.adapters["classify"], tmp_path / "zero", 0.0)
    cfg = ServeConfig(
        model=str(example.base),
        served_model_name="support",
        engine=EngineSettings(dtype="float32"),
        port=free_port(),
        adapters=(
            ServedAdapter("classify", str(example.adapters["classify"]), 8),
            ServedAdapter("faint", str(faint), 8),
            ServedAdapter("zero", str(zero), 8),
        ),
    )
    srv = VllmServer(plan_launch(cfg), log_path=tmp_path / "server.log")
    try:
        srv.start()
        srv.wait_ready(timeout=600)
        report = run_smoke(srv.plan.url, base_model="support")
    finally:
        srv.stop()
    answers = {m.model: m for m in report.models}
    assert answers["faint"].answer == answers["support"].answer, "the case would not prove the point"
    failed = [(c.name, c.model) for c in report.checks if not c.passed]
    assert failed == [("adapter applied", "zero")], report.checks
    assert answers["zero"].distance_to_base == 0.0
    assert 0 < 1e-3 < answers["faint"].distance_to_base < 0.1 < answers["classify"].distance_to_base


def test_bench_reports_strict_json_and_fails_when_requests_fail(server):
    """`bench` through the console script: a healthy run exits 0 with strict JSON (no NaN: a parser that refuses
    NaN reads it); every request to an unknown model failing is exit 8 with the server's reason, not a quiet 0."""
    from helpers import run_console

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in --json"))

    env = {API_KEY_VAR: API_KEY}
    res = run_console(
        "bench",
        "--url",
        server.plan.url,
        "--model",
        "classify",
        "--requests-per-model",
        "2",
        "--max-tokens",
        "4",
        "--concurrency",
        "2",
        "--api-key-env",
        API_KEY_VAR,
        "--json",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    report = strict(res.stdout)
    assert report["passed"] and report["models"][0]["requests"] == 2 and report["models"][0]["failures"] == 0
    res = run_console(
        "bench",
        "--url",
        server.plan.url,
        "--model",
        "nope",
        "--requests-per-model",
        "2",
        "--max-tokens",
        "4",
        "--api-key-env",
        API_KEY_VAR,
        "--json",
        env=env,
    )
    assert res.returncode == 8 and "nope" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_http_errors_carry_the_status_and_the_servers_message(server):
    """The client raises by kind: an unknown model is an HttpError (exit 8) with vLLM's status and its own
    message. An adapter command's endpoint failure is an AdminError (exit 9) that keeps the endpoint's error."""
    from lora_deploy.errors import EXIT_ADMIN, EXIT_SMOKE, AdminError, EndpointError, HttpError
    from lora_deploy.serve.admin import list_models, unload_runtime_adapter
    from lora_deploy.serve.client import Endpoint

    with pytest.raises(HttpError) as e:
        Endpoint(server.plan.url, API_KEY).complete("no-such-model", "hi")
    assert e.value.status == 404 and "no-such-model" in e.value.detail and e.value.exit_code == EXIT_SMOKE
    with pytest.raises(AdminError) as admin:
        unload_runtime_adapter(server.plan.url, "no-such-adapter", API_KEY)
    assert admin.value.exit_code == EXIT_ADMIN and "no-such-adapter" in admin.value.message, admin.value
    with pytest.raises(AdminError) as down:
        list_models(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert isinstance(down.value.__cause__, EndpointError) and "cannot connect" in down.value.message
