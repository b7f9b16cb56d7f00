"""A fleet that survives faults, on real vLLM: two replicas started as the rendered Deployment starts its container,
one adapter store, vLLM's own router in front (tests/fleet_harness.py).

Answers are judged against transformers + PEFT (float32, greedy, token for token), as the other serving tests judge
them. The same scenario with larger numbers is ``make bench-fleet``; its measured numbers are in docs/fleet.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from fleet_harness import SERVED, Fleet
from lora_deploy.examples.tiny import PROMPT_TEMPLATE, TICKETS, greedy_answer

PROMPTS = [PROMPT_TEMPLATE.format(message=ms[0]) for ms in TICKETS.values()]


@pytest.fixture(scope="module")
def fleet(example, tmp_path_factory):
    from helpers import require_cpu_build

    require_cpu_build()
    f = Fleet(tmp_path_factory.mktemp("fleet"), example)
    try:
        f.start()
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def expected(example):
    """transformers + PEFT's greedy answers: the base, each adapter."""
    return {
        name: {p: greedy_answer(example.base, p, adapter=path, max_new_tokens=16) for p in PROMPTS}
        for name, path in [("base", None), *example.adapters.items()]
    }


def test_an_adapter_published_while_requests_flow_is_served_by_every_replica(fleet, expected, example):
    """No restart: published into the store while requests for another adapter flow through the router, the new
    adapter answers on each replica (asked directly) and through the router, each answer the adapter's own."""
    stop, flowing = threading.Event(), {"ok": 0, "bad": []}

    def traffic():
        client = fleet.client()
        while not stop.is_set():
            for p in PROMPTS:
                try:
                    text = fleet.complete(client, "classify", p)
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    text = repr(e)
                if text == expected["classify"][p]:
                    flowing["ok"] += 1
                else:
                    flowing["bad"].append(text)

    worker = threading.Thread(target=traffic)
    worker.start()
    done = fleet.publish(example.adapters["reply"], "late")
    if done.returncode != 0:
        stop.set()
        worker.join(timeout=120)
    assert done.returncode == 0, done.stderr
    published = json.loads(done.stdout)
    assert published["path"].endswith("/late")
    try:
        for replica in fleet.replicas:
            client = fleet.client(replica.url)
            for p in PROMPTS:
                assert fleet.complete(client, "late", p) == expected["reply"][p], (replica.name, p)
        router = fleet.client()
        for p in PROMPTS * 2:  # round robin: both replicas answer through the router
            assert fleet.complete(router, "late", p) == expected["reply"][p], p
    finally:
        stop.set()
        worker.join(timeout=120)
    assert flowing["ok"] > 0 and flowing["bad"] == [], flowing
    ids = {m.id for m in fleet.client(fleet.replicas[1].url).models.list().data}
    assert {SERVED, "classify", "late"} <= ids


def test_the_smoke_job_checks_each_replica_with_the_stores_adapters(fleet, tmp_path):
    """The in-cluster smoke Job's own script, run once per replica (each "pod" has its own port here): it loads
    the store's adapters and passes on every replica."""
    from fleet_harness import API_KEY, fleet_spec
    from helpers import mount_smoke_job
    from lora_deploy.k8s.render import render_manifests
    from lora_deploy.k8s.spec import parse_spec

    files = render_manifests(parse_spec(fleet_spec())).files
    config, code, smoke = mount_smoke_job(files, tmp_path)
    assert smoke["store"] == "/adapters" and smoke["replicas"] == 2
    for replica in fleet.replicas:
        (config / "smoke.json").write_text(
            json.dumps(
                {
                    **smoke,
                    "pods_host": "127.0.0.1",
                    "port": replica.port,
                    "replicas": 1,
                    "store": str(fleet.store),
                    "wait_seconds": 30,
                }
            )
        )
        env = {**os.environ, "LORA_DEPLOY_CONFIG_DIR": str(config), "PYTHONPATH": str(code), "VLLM_API_KEY": API_KEY}
        job = subprocess.run(
            [sys.executable, str(code / "smoke_job.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert job.returncode == 0, job.stdout + job.stderr
        assert "PASSED" in job.stdout and "late" in job.stdout


# Requests the router may lose when a replica dies under them. Measured with this 36-request burst: 0 in 4 runs and
# 1 in a 5th (HTTP 500 from vllm-router for a request in flight on the killed replica, which it did not retry);
# 0 of 240 in each of two `make bench-fleet` runs. A wrong answer is never tolerated.
MAX_LOST_TO_THE_KILL = 2


def test_a_replica_killed_mid_burst_gives_no_wrong_answer_loses_at_most_its_in_flight_requests_and_comes_back(
    fleet, expected
):
    """SIGKILL to one replica during a burst of non-streaming requests through the router: none wrong, and at most
    the requests in flight on the killed replica failed (the router retries the rest on the other replica). Started
    again with the same command, the replica serves the startup adapter and every published one with no manual
    step."""
    asks = [
        (m, p, expected[a][p])
        for _ in range(3)
        for p in PROMPTS
        for m, a in (("classify", "classify"), ("late", "reply"), (SERVED, "base"))
    ]
    victim = fleet.replicas[1]
    try:
        result = fleet.burst(asks, concurrency=4, during=lambda: fleet.kill_replica(victim), after=len(asks) // 3)
        print(f"\nburst through the router, one replica SIGKILLed: {result}")
        assert result.sent == len(asks)
        assert result.wrong == 0, result.failures
        assert result.failed <= MAX_LOST_TO_THE_KILL, result.failures
        assert all("500" in f or "Connection" in f for f in result.failures), result.failures
    finally:
        if victim.server.proc.poll() is not None:  # the next test needs both replicas, whatever happened here
            fleet.start_replica(victim)
            fleet.wait_replica(victim)
    client = fleet.client(victim.url)
    for p in PROMPTS:
        assert fleet.complete(client, "late", p) == expected["reply"][p], p
        assert fleet.complete(client, "classify", p) == expected["classify"][p], p


def test_replace_with_endpoints_serves_the_new_version_everywhere(fleet, expected, example):
    """`adapters publish --replace` with the publish Job's arguments, which name every replica: every later answer for
    the name is the new version's, on each replica and through the router (a new path per version, so no
    prefix-cache block of the old weights is reused), and the previous version stays on the volume for replicas
    told to load it before."""
    for replica in fleet.replicas:  # both hold the old version before the replace
        assert fleet.complete(fleet.client(replica.url), "late", PROMPTS[0]) == expected["reply"][PROMPTS[0]]
    done = fleet.publish(example.adapters["classify"], "late", "--replace")  # the Job's --replicas: every pod
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [e["action"] for e in report["endpoints"]] == ["reloaded", "reloaded"], report
    versions = sorted(p.name for p in (fleet.store / ".lora-deploy" / "versions" / "late").iterdir())
    assert versions == sorted([report["replaced_version"], report["adapter"]["version"]])
    for replica in fleet.replicas:
        client = fleet.client(replica.url)
        for p in PROMPTS:
            assert fleet.complete(client, "late", p) == expected["classify"][p], (replica.name, p)
    router = fleet.client()
    for p in PROMPTS * 2:
        assert fleet.complete(router, "late", p) == expected["classify"][p], p
