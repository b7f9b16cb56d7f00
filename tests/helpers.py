"""Helpers the tests import by name (``from helpers import make_base``): builders of tiny models and real PEFT
adapters (made locally, no hub), the oracle's logits, the console script as a user runs it, free ports, CPU
binding for servers started together, and where the published CRDs are. Fixtures stay in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

CRD_SKIP = "the published CRDs are not on this machine"


def quiet_transformers() -> None:
    """Tests load many small models: transformers' per-load progress bars and advisories only hide our output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def make_base(
    folder: Path, arch: str = "llama", *, dtype: str = "float32", seed: int = 0, tokenizer: bool = False, **overrides
) -> Path:
    """A random tiny model of ``arch`` saved to ``folder``."""
    from lora_deploy.examples.tiny import build_random_base

    quiet_transformers()
    build_random_base(folder, arch, dtype=dtype, seed=seed, tokenizer=tokenizer, **overrides)
    return folder


def load_base(base: Path, *, resize: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    return model


def make_adapter(
    base: Path,
    folder: Path,
    *,
    seed: int = 1,
    resize: int | None = None,
    perturb: float = 0.05,
    save_kwargs: dict | None = None,
    **lora_kwargs,
) -> Path:
    """Train-like PEFT adapter: get_peft_model with init_lora_weights=False, every trainable tensor nudged."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_base(base, resize=resize)
    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
        with torch.no_grad():  # stand-in for training: modules_to_save, biases, token rows all move
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(perturb * torch.randn_like(p))
        peft_model.save_pretrained(folder, **(save_kwargs or {}))
    return folder


def peft_model(base: Path, adapters: list[Path], weights: list[float] | None = None, *, resize: int | None = None):
    """The unmerged PEFT model (several adapters via the exact "cat" combination), float32, eval mode."""
    from peft import PeftModel

    model = load_base(base, resize=resize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        if len(adapters) > 1 or (weights and weights[0] != 1.0):
            for i, a in enumerate(adapters[1:], start=1):
                pm.load_adapter(a, adapter_name=f"a{i}")
            names = [f"a{i}" for i in range(len(adapters))]
            pm.add_weighted_adapter(names, list(weights), "mix", combination_type="cat")
            pm.set_adapter("mix")
            for n in names:
                pm.delete_adapter(n)
    return pm.eval()


def peft_merged_state(
    base: Path, adapters: list[Path], weights: list[float] | None = None, *, resize: int | None = None
) -> dict:
    """PEFT's merge_and_unload() in float32: the tensor oracle wherever it agrees with the unmerged model."""
    merged = peft_model(base, adapters, weights, resize=resize).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


PROBE_IDS = [[1, 5, 17, 99, 250, 3, 42, 7, 64, 128], [2, 9, 33, 0, 11, 300, 4, 4, 8, 16]]


def logits_of(model, vocab: int | None = None):
    """Float32 logits of ``model`` on fixed token ids (below ``vocab``), no grad."""
    import torch

    ids = torch.tensor(PROBE_IDS) % (vocab or 512)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def loaded_model(folder: Path):
    """A checkpoint loaded by plain transformers (float32); fails on any missing or unexpected tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{folder} does not load cleanly: {problems}"
    return model.eval()


def check_against_oracle(base, adapters, out, report, *, weights=None, resize=None):
    """The oracle is the unmerged PEFT model: our merged checkpoint computes its logits (float32); our tensors
    equal PEFT's merge_and_unload() wherever PEFT's merged model agrees with its unmerged one, and where it
    does not, the report says so. Returns whether PEFT's merge was right."""
    config = json.loads((base / "config.json").read_text())
    vocab = resize or config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    pm = peft_model(base, adapters, weights, resize=resize)
    want = logits_of(pm, vocab)
    assert not torch.allclose(want, logits_of(load_base(base, resize=resize).eval(), vocab), atol=1e-3), (
        "the adapter changes nothing: the test would prove nothing"
    )
    got = logits_of(loaded_model(out), vocab)
    # float32 summation order differs between a merged and an unmerged forward: allow rounding at the logits' scale
    atol = 1e-4 + 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m: f"merged vs unmerged logits: {m}")
    peft_merged = pm.merge_and_unload()
    peft_right = torch.allclose(logits_of(peft_merged, vocab), want, rtol=1e-4, atol=atol)
    if peft_right:
        expected = {k: v.detach() for k, v in peft_merged.state_dict().items()}
        ours = loaded_state(out)
        assert sorted(ours) == sorted(expected)
        for name, ref in expected.items():
            torch.testing.assert_close(ours[name], ref, rtol=2e-6, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")
    else:
        assert report.peft_differs, "PEFT's merge is wrong here, and the report must say where"
    # the files hold base names only, never LoRA leftovers, and never adapter_config.json
    names = file_tensors(out)
    # the pre-rename completeness check agrees with transformers on a checkpoint that loads cleanly
    from lora_deploy.model.layout import expected_tensors

    assert expected_tensors(json.loads((out / "config.json").read_text())).problems(names) == []
    assert not [n for n in names if "lora" in n or "base_layer" in n or "modules_to_save" in n]
    assert not (out / "adapter_config.json").exists()
    return peft_right


def loaded_state(folder: Path) -> dict:
    """A checkpoint as transformers loads it (ties applied), in float32."""
    return {k: v.detach().float().clone() for k, v in load_base(folder).state_dict().items()}


def file_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def run_cli(*args: str):
    """Run the real console entry point in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from lora_deploy.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, stdout.getvalue(), stderr.getvalue()


def run_console(*args: str, env: dict | None = None, timeout: float = 300):
    """Run the installed ``lora-deploy`` console script as a user does (its own process: an uncaught exception
    shows up as a traceback on stderr, and the exit code is the process's); returns a CompletedProcess."""
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).parent / "lora-deploy"
    command = [str(script)] if script.exists() else [shutil.which("lora-deploy") or "lora-deploy"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )


def assert_user_error(res, code: int, *needles: str) -> None:
    """A user's mistake, as the console script reports it: the documented exit code, an ``Error:`` line naming
    what was wrong, no traceback, and no invitation to debug an expected failure."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "Error: " in res.stderr and "LORA_DEPLOY_DEBUG" not in res.stderr, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


def require_cpu_build() -> None:
    """Skip a test that measures vLLM's CPU build (its kernels, KV blocks, allocations) when the installed vLLM is
    another one (the official CUDA vLLM on a GPU machine), saying so."""
    from lora_deploy.serve.flags import detect_vllm

    install = detect_vllm()
    if install is None or not install.cpu:
        pytest.skip(f"measures vLLM's CPU build; installed: {install.distribution if install else 'no vLLM'}")


def scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    """A copy of an adapter with lora_B scaled: small factors keep it applied but greedy-identical to the base;
    0 makes it a no-op that must be caught."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "adapter_model.safetensors")
    save_file(
        {k: v * factor if "lora_B" in k else v for k, v in state.items()},
        dst / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    return dst


def published_crds() -> Path:
    """The folder holding every published CRD of ``lora_deploy.k8s.crds.PUBLISHED_CRDS`` (LeaderWorkerSet, KEDA,
    InferencePool, HTTPRoute, PodMonitor, llm-d...), each with its published sha256; never copied into this
    repository. Looked for in ``$LORA_DEPLOY_CRDS``, then ``../shared/crds`` beside the repository, then the cache
    that ``make crds`` fills (``~/.cache/lora-deploy/crds``). Where none holds them all, the test is skipped with one
    reason naming ``make crds``; under CI (``CI=true``) it fails instead, so CI can never skip a CRD check."""
    from lora_deploy.k8s.crds import CRDS_ENV, missing_crds

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-deploy" / "crds"
    candidates = [
        Path(os.environ[CRDS_ENV]) if os.environ.get(CRDS_ENV) else None,
        Path(__file__).resolve().parents[2] / "shared" / "crds",
        cache,
    ]
    looked = []
    for folder in (c for c in candidates if c is not None):
        missing = missing_crds(folder)
        if not missing:
            return folder
        looked.append(f"{folder} ({len(missing)} missing or not the published file)")
    reason = (
        f"{CRD_SKIP}: run `make crds` once (downloads and checks them into "
        f"~/.cache/lora-deploy/crds; looked in {'; '.join(looked)})"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must not skip a CRD check: {reason}")
    pytest.skip(reason)


def mount_smoke_job(files: dict, root: Path) -> tuple[Path, Path, dict]:
    """Lay out the rendered smoke Job as its pod sees it: the ConfigMap's files under ``root/etc`` (the config
    mount) and the mounted code under ``root/opt``; returns (config dir, code dir, the smoke.json settings)."""
    data = files["configmap.yaml"]["data"]
    items = files["smoke-test-job.yaml"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"]
    mounts = {i["key"]: i["path"] for i in items}
    config, code = root / "etc", root / "opt"
    config.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        (config / key).write_text(value)
        if key in mounts:
            (code / mounts[key]).parent.mkdir(parents=True, exist_ok=True)
            (code / mounts[key]).write_text(value)
    return config, code, json.loads(data["smoke.json"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_cores(index: int, count: int) -> str:
    """The cores (``VLLM_CPU_OMP_THREADS_BIND``) of the ``index``-th of ``count`` vLLM CPU servers that run at once.

    vLLM's ``auto`` binding gives every engine the same cores, all but one it reserves for the front end: core 0
    alone on a 2-core machine, so servers started together took turns on one core while the other idled (measured
    here: four SmolLM2 servers starting together kept two cores 36% busy). Each server gets its own share instead,
    round-robin when there are more servers than cores."""
    cores = sorted(os.sched_getaffinity(0))
    if count >= len(cores):
        return str(cores[index % len(cores)])
    share = len(cores) // count
    mine = cores[index * share : (index + 1) * share]
    return ",".join(map(str, mine))


def spread_cores(plans: list) -> list:
    """``plans`` (LaunchPlans of vLLM CPU servers started together), each bound to its own cores by
    :func:`own_cores`; a plan for another build (no ``VLLM_CPU_OMP_THREADS_BIND``) or one the user bound is kept."""
    import dataclasses

    return [
        dataclasses.replace(p, env={**p.env, "VLLM_CPU_OMP_THREADS_BIND": own_cores(i, len(plans))})
        if p.env.get("VLLM_CPU_OMP_THREADS_BIND") == "auto"
        else p
        for i, p in enumerate(plans)
    ]


def start_cli(*args: str, log: Path):
    """The CLI as a separate process in its own session (so a test can signal its whole group)."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "lora_deploy.cli", *args],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
        start_new_session=True,
    )


def wait_for_log(pattern: str, log: Path, proc, timeout: float = 600):
    """The first match of ``pattern`` in the CLI's stderr log; fails with the log's tail if the CLI exits first."""
    import re
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        if proc.poll() is not None:
            raise AssertionError(f"CLI exited {proc.returncode}: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {pattern!r}: {log.read_text()[-3000:]}")


def ask_tickets(port: int, model: str, task: str) -> list[str]:
    """The official OpenAI client asks ``model`` the demo tickets through the chat template, greedily."""
    from openai import OpenAI

    from lora_deploy.examples.smollm2 import DEMO_TICKETS, messages

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    return [
        client.chat.completions.create(model=model, messages=messages(task, t), max_tokens=12, temperature=0)
        .choices[0]
        .message.content
        for t in DEMO_TICKETS
    ]


def serve_then(args: list[str], log, ask):
    """Start the CLI, wait until it serves (its smoke test passed), ask, then SIGTERM it."""
    import subprocess

    proc = start_cli(*args, log=log)
    try:
        wait_for_log(r"Serving at ", log, proc)  # printed only once every smoke check passed
        return ask()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
