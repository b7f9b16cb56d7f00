"""A fleet on one machine: vLLM replicas started exactly as the rendered Deployment starts its container, one adapter
store, and vLLM's own router (PyPI ``vllm-router``) in front as the Service/gateway stand-in.

Shared by tests/test_fleet.py and ``make bench-fleet`` (benchmarks/fleet_bench.py). Each replica runs the
container's ``args`` and ``env`` from ``render_manifests`` with the pod's folders mapped to local ones (``/models``,
the store's mount path and the ConfigMap's, which holds the guard middleware) and its own port; the only other
changes are what the CPU build needs, listed in :meth:`Fleet.launch_plan` (its module entry point,
``--enforce-eager --max-num-seqs 8`` and a KV cache size, as ``lora-deploy dynamic`` starts it). Adapters are
published with the publish Job template's own arguments, mapped the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_VAR = "LORA_DEPLOY_FLEET_KEY"
API_KEY = "fleet-test-key-not-secret"
SERVED = "support"
STORE_MOUNT = "/adapters"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_spec(replicas: int = 2) -> dict:
    """The deploy spec the fleet is rendered from: a dynamic tiny base, one startup adapter, an adapter store."""
    return {
        "name": "support",
        "namespace": "llm",
        "mode": "dynamic",
        "model": "/models/base",
        "servedModelName": SERVED,
        "adapters": [{"name": "classify", "path": "/models/adapters/classify", "rank": 8}],
        "adapterStore": {
            "claim": "adapters",
            "maxLoraRank": 16,
            "mountPath": STORE_MOUNT,
            "publishImage": "example.org/lora-deploy:test",
        },
        "replicas": replicas,
        "apiKeySecret": {"name": "vllm-api-key"},
        # float32: answers comparable token for token with transformers + PEFT; 4 LoRA slots for at most 3
        # adapters keeps the CPU build's last slot empty (its mixed-batch workaround)
        "vllm": {"dtype": "float32", "maxModelLen": 512, "maxLoras": 4},
    }


@dataclass
class Replica:
    name: str
    port: int
    server: object  # lora_deploy.serve.launcher.VllmServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class BurstResult:
    """A burst of non-streaming requests through the router: how many were sent, answered right, failed, wrong."""

    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    wrong: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Fleet:
    """Replicas + store + router under ``root``; ``example`` is the tiny example (base and adapters)."""

    def __init__(self, root: Path, example, replicas: int = 2):
        from lora_deploy.k8s.render import render_manifests
        from lora_deploy.k8s.spec import parse_spec

        os.environ[API_KEY_VAR] = API_KEY
        self.root, self.example = Path(root), example
        self.models = self.root / "models"
        (self.models / "adapters").mkdir(parents=True, exist_ok=True)
        for link, target in (
            (self.models / "base", example.base),
            (self.models / "adapters" / "classify", example.adapters["classify"]),
        ):
            if not link.exists():
                link.symlink_to(target)
        self.store = self.root / "store"
        self.store.mkdir(exist_ok=True)  # the claim exists before the pods start; vLLM requires the folder
        files = render_manifests(parse_spec(fleet_spec(replicas))).files
        self.config = self.root / "config"  # the ConfigMap as the pod mounts it (the guard middleware among it)
        self.config.mkdir(exist_ok=True)
        for key, value in files["configmap.yaml"]["data"].items():
            (self.config / key).write_text(value)
        self.container = files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
        self.publish_args = files["publish-job.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
        self.replicas = [Replica(f"replica-{i}", free_port(), None) for i in range(replicas)]
        self.router_port = free_port()
        self.router: subprocess.Popen | None = None

    # ------------------------------------------------------------------ the pod's paths, here
    def local(self, value: str) -> str:
        if value.startswith("{"):  # a --lora-modules entry: its path is a pod path too
            import json

            entry = json.loads(value)
            return json.dumps({**entry, "path": self.local(entry["path"])}, separators=(",", ":"))
        from lora_deploy.k8s.objects import CONFIG_DIR

        for mount, folder in (("/models", self.models), (STORE_MOUNT, self.store), (CONFIG_DIR, self.config)):
            if value == mount or value.startswith(mount + "/"):
                return str(folder) + value[len(mount) :]
        return value

    def launch_plan(self, replica: Replica):
        from lora_deploy.serve.flags import CPU_KVCACHE_GIB, require_vllm
        from lora_deploy.serve.launcher import LaunchPlan

        install = require_vllm()
        model, *args = [self.local(a) for a in self.container["args"]]
        args[args.index("--host") + 1] = "127.0.0.1"
        args[args.index("--port") + 1] = str(replica.port)
        env = {e["name"]: self.local(e["value"]) for e in self.container["env"] if "value" in e}
        env["VLLM_API_KEY"] = API_KEY  # from the Secret in the cluster
        if install.cpu:
            argv = install.launch_prefix + ["--model", model] + args + ["--enforce-eager", "--max-num-seqs", "8"]
            env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
        else:
            argv = install.launch_prefix + [model] + args
        return LaunchPlan(
            argv=argv,
            env=env,
            url=replica.url,
            expected_models=[SERVED, "classify"],
            host="127.0.0.1",
            port=replica.port,
            startup_adapters=("classify",),
        )

    # ------------------------------------------------------------------ processes
    def start_replica(self, replica: Replica) -> None:
        from lora_deploy.serve.launcher import VllmServer

        replica.server = VllmServer(
            self.launch_plan(replica), log_path=self.root / f"{replica.name}.log", api_key=API_KEY
        )
        replica.server.start()

    def wait_replica(self, replica: Replica, timeout: float = 600) -> None:
        replica.server.wait_ready(timeout=timeout)

    def kill_replica(self, replica: Replica) -> None:
        """SIGKILL to the replica's whole process group, as a node loss or the OOM killer would."""
        os.killpg(replica.server.pgid, signal.SIGKILL)
        replica.server.proc.wait(timeout=30)

    def start(self) -> None:
        for r in self.replicas:
            self.start_replica(r)
        for r in self.replicas:
            self.wait_replica(r)
        self.start_router()

    def start_router(self) -> None:
        router = Path(sys.executable).with_name("vllm-router")
        argv = [
            str(router),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.router_port),
            "--policy",
            "round_robin",
            "--worker-urls",
            *[r.url for r in self.replicas],
            "--log-level",
            "warning",
        ]
        log = open(self.root / "router.log", "ab")
        self.router = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                raise RuntimeError(f"vllm-router exited: {(self.root / 'router.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.router_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("vllm-router did not listen within 120 s")

    def stop(self) -> None:
        if self.router is not None and self.router.poll() is None:
            os.killpg(self.router.pid, signal.SIGTERM)
            try:
                self.router.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.router.pid, signal.SIGKILL)
        for r in self.replicas:
            if r.server is not None:
                r.server.stop()

    # ------------------------------------------------------------------ clients
    def client(self, url: str | None = None):
        from openai import OpenAI

        return OpenAI(base_url=(url or self.router_url) + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @staticmethod
    def complete(client, model: str, prompt: str) -> str:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        return r.choices[0].text

    def publish(self, source: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
        """The publish Job's own command line, with the pod's paths mapped here and its ``--replicas`` (the headless
        Service's name, one address per ready pod) standing for this fleet's replica URLs."""
        args = [
            self.local(a.replace("$(ADAPTER_SOURCE)", str(source)).replace("$(ADAPTER_NAME)", name))
            for a in self.publish_args
        ]
        at = args.index("--replicas")
        args[at : at + 2] = [a for r in self.replicas for a in ("--endpoint", r.url)]
        script = Path(sys.executable).with_name("lora-deploy")
        return subprocess.run(
            [str(script), "adapters", "publish", *args, *extra],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "VLLM_API_KEY": API_KEY},
        )

    def burst(
        self, asks: list[tuple[str, str, str]], *, concurrency: int = 4, during=None, after: int | None = None
    ) -> BurstResult:
        """Send ``asks`` (model, prompt, expected answer) through the router; ``during()`` runs once ``after``
        answers came back (a replica killed mid-burst)."""
        result = BurstResult()
        client = self.client()
        done = []

        def one(ask):
            model, prompt, expected = ask
            try:
                text = self.complete(client, model, prompt)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                return "failed", f"{model}: {type(e).__name__}: {e}"
            finally:
                done.append(1)
            return ("ok", "") if text == expected else ("wrong", f"{model} {prompt!r}: {text!r} != {expected!r}")

        start = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            futures = []
            for i, ask in enumerate(asks):
                futures.append(pool.submit(one, ask))
                result.sent += 1
                if during is not None and after is not None and i == after:
                    while len(done) < after:
                        time.sleep(0.01)
                    during()
            for f in futures:
                status, why = f.result()
                if status == "ok":
                    result.succeeded += 1
                elif status == "failed":
                    result.failed += 1
                    result.failures.append(why)
                else:
                    result.wrong += 1
                    result.failures.append(why)
        result.seconds = round(time.monotonic() - start, 2)
        return result
