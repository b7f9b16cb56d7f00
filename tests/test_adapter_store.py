"""The adapter store: what a publish writes, what it refuses, and that a killed publish leaves nothing servable.

Real vLLM serving from a store (publish while serving, several replicas, replace, restart) is tested in
tests/test_fleet.py; these tests hold the store's own guarantees, through the installed console script where a
user would meet them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_user_error, edit_json, make_adapter, make_base, run_cli, run_console

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-bases")
    base = make_base(root / "base", "llama")
    other = make_base(root / "other", "llama", hidden_size=48, intermediate_size=96)
    return base, other


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    base, other = bases
    root = tmp_path_factory.mktemp("store-adapters")
    return {
        "a": make_adapter(base, root / "a", seed=1, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(base, root / "b", seed=2, target_modules=["q_proj", "v_proj"]),
        "big": make_adapter(base, root / "big", seed=3, r=32, lora_alpha=32, target_modules=["q_proj"]),
        "other": make_adapter(other, root / "other", seed=4, target_modules=["q_proj"]),
    }


def _ok(*args: str) -> dict | list | None:
    """A command that must succeed, run in-process (the refusals above go through the console script); its --json."""
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    return json.loads(stdout) if "--json" in args else None


def _store(tmp_path: Path, base: Path, rank: int = 16) -> tuple[Path, list[str]]:
    """A store created by its first publish, for servers started with ``--model <base>``."""
    store = tmp_path / "store"
    return store, ["--store", str(store), "--base", str(base), "--max-lora-rank", str(rank)]


def test_publish_writes_a_version_the_resolver_accepts_and_lists_it(bases, adapters, tmp_path):
    base, _ = bases
    store, create = _store(tmp_path, base)
    edit_json(adapters["a"] / "adapter_config.json", base_model_name_or_path="org/some-hub-base")
    res = run_console("adapters", "publish", str(adapters["a"]), "--name", "support-a", *create, "--json")
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout)
    # what vLLM's filesystem resolver reads: DIR/<name>/adapter_config.json, peft_type LORA, base == --model
    config = json.loads((store / "support-a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)
    assert (store / "support-a" / "adapter_model.safetensors").read_bytes() == (
        adapters["a"] / "adapter_model.safetensors"
    ).read_bytes()
    assert (store / "support-a").is_symlink() and not Path(os.readlink(store / "support-a")).is_absolute()
    assert done["adapter"]["original_base"] == "org/some-hub-base"
    assert any("org/some-hub-base" in n for n in done["notes"])  # the rewrite is said, not silent
    listed = run_console("adapters", "list", "--store", str(store), "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "support-a" and entry["managed"] and entry["rank"] == 4
    assert entry["original_base"] == "org/some-hub-base"


def test_publish_refuses_what_servers_could_not_serve(bases, adapters, tmp_path):
    base, _ = bases
    store, create = _store(tmp_path, base, rank=16)
    _ok("adapters", "publish", str(adapters["a"]), "--name", "a", *create)
    # rank above the store's limit, and an adapter of another base: pre-flight, before anything is written
    assert_user_error(run_console("adapters", "publish", str(adapters["big"]), "--store", str(store)), 4, "rank")
    assert_user_error(run_console("adapters", "publish", str(adapters["other"]), "--store", str(store)), 3)
    # names: unsafe folder names, the base's served name, an existing name without --replace
    for bad in ("../escape", "a/b", ".hidden"):
        assert_user_error(
            run_console("adapters", "publish", str(adapters["b"]), "--name", bad, "--store", str(store)), 3
        )
    assert_user_error(
        run_console("adapters", "publish", str(adapters["b"]), "--name", "base", "--store", str(store)),
        3,
        "served name",
    )
    assert_user_error(
        run_console("adapters", "publish", str(adapters["b"]), "--name", "a", "--store", str(store)), 5, "--replace"
    )
    # broken input: no weights
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["b"] / "adapter_config.json").read_text())
    assert_user_error(run_console("adapters", "publish", str(broken), "--store", str(store)), 3)
    # a folder that is no store, and a store made for another base
    assert_user_error(
        run_console("adapters", "publish", str(adapters["b"]), "--store", str(tmp_path / "nowhere")),
        3,
        "not an adapter store",
    )
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["a"]


def test_replace_switches_versions_and_the_old_one_leaves_the_volume(bases, adapters, tmp_path):
    base, _ = bases
    store, create = _store(tmp_path, base)
    first = json.loads(run_console("adapters", "publish", str(adapters["a"]), "--name", "s", *create, "--json").stdout)
    res = run_console(
        "adapters", "publish", str(adapters["b"]), "--name", "s", "--store", str(store), "--replace", "--json"
    )
    assert res.returncode == 0, res.stderr
    second = json.loads(res.stdout)
    assert second["replaced_version"] == first["adapter"]["version"]
    assert any("keep serving version" in n and "tell every replica" in n for n in second["notes"])  # no --endpoint
    assert (store / "s" / "adapter_model.safetensors").read_bytes() == (
        adapters["b"] / "adapter_model.safetensors"
    ).read_bytes()
    # the previous version stays (replicas told to load it may reload it after an eviction); older ones go
    versions = store / ".lora-deploy" / "versions" / "s"
    assert sorted(p.name for p in versions.iterdir()) == sorted(
        [first["adapter"]["version"], second["adapter"]["version"]]
    )
    third = _ok("adapters", "publish", str(adapters["a"]), "--name", "s", "--store", str(store), "--replace", "--json")
    assert sorted(p.name for p in versions.iterdir()) == sorted(
        [second["adapter"]["version"], third["adapter"]["version"]]
    )


def test_retire_removes_the_name_and_every_version(bases, adapters, tmp_path):
    base, _ = bases
    store, create = _store(tmp_path, base)
    _ok("adapters", "publish", str(adapters["a"]), "--name", "gone", *create)
    res = run_console("adapters", "retire", "gone", "--store", str(store))
    assert res.returncode == 0, res.stderr
    assert not (store / "gone").exists() and not (store / "gone").is_symlink()
    leftovers = [p for p in store.rglob("*") if p.name == "adapter_config.json"]
    assert leftovers == []  # nothing a crafted model name (../, nested) could still reach
    assert_user_error(run_console("adapters", "retire", "gone", "--store", str(store)), 3, "no adapter named")


def test_a_killed_publish_leaves_nothing_at_the_name_and_the_next_one_cleans_up(bases, adapters, tmp_path):
    """SIGKILL in the middle of copying the weights: DIR/NAME never appears, the partial version is litter that
    the next publish of that name removes, and that publish succeeds."""
    base, _ = bases
    store, create = _store(tmp_path, base)
    _ok("adapters", "publish", str(adapters["b"]), "--name", "other", *create)
    code = (
        "import os, shutil, signal, sys\n"
        "real = shutil.copyfile\n"
        "def dying(src, dst, **kw):\n"
        "    real(src, dst, **kw)\n"
        "    if str(src).endswith('.safetensors'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "shutil.copyfile = dying\n"
        "from lora_deploy.serve.store import publish\n"
        f"publish({str(adapters['a'])!r}, {str(store)!r}, name='half')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (store / "half").exists() and not (store / "half").is_symlink()
    litter = list((store / ".lora-deploy" / "versions" / "half").iterdir())
    assert litter and all(".partial-" in p.name for p in litter)
    res = run_console("adapters", "publish", str(adapters["a"]), "--name", "half", "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr
    version = json.loads(res.stdout)["adapter"]["version"]
    assert [p.name for p in (store / ".lora-deploy" / "versions" / "half").iterdir()] == [version]


def test_a_hand_copied_folder_is_listed_with_why_it_would_not_load(bases, adapters, tmp_path):
    import shutil

    base, _ = bases
    store, create = _store(tmp_path, base)
    _ok("adapters", "publish", str(adapters["a"]), "--name", "a", *create)
    shutil.copytree(adapters["b"], store / "manual")
    edit_json(store / "manual" / "adapter_config.json", base_model_name_or_path="somewhere/else")
    listed = {a["name"]: a for a in json.loads(run_console("adapters", "list", "--store", str(store), "--json").stdout)}
    assert listed["manual"]["managed"] is False and "somewhere/else" in listed["manual"]["problem"]
    assert listed["a"]["problem"] is None


def test_a_server_of_another_base_or_a_smaller_rank_is_refused(bases, adapters, tmp_path):
    """`dynamic --adapter-store` checks the store's record before anything starts (exit 3); a dry run of a new store
    writes nothing."""
    base, other = bases
    fresh = tmp_path / "fresh"
    res = run_console(
        "dynamic", "--base", str(base), "--adapter-store", str(fresh), "--max-lora-rank", "16", "--dry-run"
    )
    assert res.returncode == 0, res.stderr
    assert not fresh.exists()
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in res.stdout + res.stderr
    store, create = _store(tmp_path, base, rank=16)
    _ok("adapters", "publish", str(adapters["a"]), "--name", "a", *create)
    assert_user_error(
        run_console("dynamic", "--base", str(other), "--adapter-store", str(store), "--dry-run"),
        3,
        "made for another server",
    )
    assert_user_error(
        run_console("dynamic", "--base", str(base), "--adapter-store", str(store), "--max-lora-rank", "8", "--dry-run"),
        3,
        "rank 16",
    )
    assert_user_error(
        run_console("dynamic", "--base", str(base), "--adapter-store", str(tmp_path / "new"), "--dry-run"),
        3,
        "--max-lora-rank",
    )
    ok = run_console("dynamic", "--base", str(base), "--adapter-store", str(store), "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "--max-lora-rank 16" in ok.stdout + ok.stderr


def test_moe_expert_lora_is_refused_from_a_store_where_vllm_could_serve_it(bases, adapters, tmp_path, monkeypatch):
    """On a GPU build pre-flight accepts LoRA on fused MoE experts (vLLM serves it when the load request marks it
    is_3d_lora_weight); the filesystem resolver's load request never does, so publish refuses it (exit 4) and
    writes nothing. Here the CPU build's pre-flight (which refuses MoE expert LoRA itself) is given a GPU verdict."""
    import dataclasses

    from lora_deploy.errors import UnsupportedError
    from lora_deploy.hub import resolve_ref
    from lora_deploy.serve import preflight
    from lora_deploy.serve.store import describe_server, publish

    real = preflight.check_adapters

    def gpu_verdict(*args, **kwargs):
        report = real(*args, **kwargs)
        return dataclasses.replace(report, accepted=[dataclasses.replace(c, moe_3d=True) for c in report.accepted])

    monkeypatch.setattr(preflight, "check_adapters", gpu_verdict)
    base, _ = bases
    store = tmp_path / "store"
    with pytest.raises(UnsupportedError, match="filesystem resolver"):
        publish(
            str(adapters["a"]),
            store,
            name="experts",
            create=describe_server(resolve_ref(base, kind="base model"), str(base), "base", 16, str(store)),
        )
    assert not (store / "experts").exists() and not (store / ".lora-deploy" / "versions" / "experts").exists()


def test_a_hub_adapter_is_named_after_its_repository_not_its_snapshot(bases, adapters, tmp_path, monkeypatch):
    """A hub id resolves to a snapshot folder named by its commit hash; without --name the adapter is published
    under the repository's name (read from a local hub cache: nothing reaches the Hub)."""
    import shutil

    base, _ = bases
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--support-lora"
    shutil.copytree(adapters["b"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    store, create = _store(tmp_path, base)
    res = run_console(
        "adapters",
        "publish",
        "acme/support-lora",
        *create,
        "--json",
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout)
    assert done["adapter"]["name"] == "support-lora" and done["adapter"]["source"] == "acme/support-lora"
    assert (store / "support-lora" / "adapter_config.json").is_file()


def test_dynamic_resolves_its_base_once(bases, tmp_path, monkeypatch):
    """`dynamic --base B --adapter-store S` resolves B once, where the user named it, and every step after
    (pre-flight, the store's record, the served name, the served folder) takes that record. It used to be resolved
    three times (pre-flight, the store's record, the launch): for a hub base, three lookups of the hub."""
    from lora_deploy import hub
    from lora_deploy.serve import preflight

    base, _ = bases
    calls: list[str] = []
    depth = [0]  # resolve_headers of a folder is resolve_ref inside: one resolution, counted once

    def counted(function):
        def wrapper(ref, *args, **kwargs):
            if kwargs.get("kind") == "base model" and depth[0] == 0:
                calls.append(f"{function.__name__}({ref})")
            depth[0] += 1
            try:
                return function(ref, *args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for module, name in ((hub, "resolve_ref"), (hub, "resolve_headers"), (preflight, "resolve_headers")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    code, _, stderr = run_cli(
        "dynamic", "--base", str(base), "--adapter-store", str(tmp_path / "s"), "--max-lora-rank", "16", "--dry-run"
    )
    assert code == 0, stderr
    assert calls == [f"resolve_headers({base})"], calls
