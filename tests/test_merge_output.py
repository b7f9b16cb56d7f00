"""The merged folder is a complete, standard checkpoint; the CLI's JSON, provenance, sharding and memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import file_tensors, loaded_state, make_adapter, make_base, run_cli
from lora_deploy.hub import sha256_file


def test_cli_json_summary_and_provenance(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(
        "merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(out), "--json"
    )
    assert rc == 0, stderr
    summary = json.loads(stdout)["merge"]
    assert summary["dtype"] == "float16" and summary["shards"] == ["model.safetensors"]
    assert summary["tensors_changed"] == 6  # q, v, down in 2 layers
    prov = json.loads((out / "lora_deploy_merge.json").read_text())
    assert prov["base"]["files"]["model.safetensors"] == sha256_file(llama_base / "model.safetensors")
    ad = prov["adapters"][0]
    assert ad["files"]["adapter_model.safetensors"] == sha256_file(llama_adapter / "adapter_model.safetensors")
    assert ad["weight"] == 1.0 and ad["modules"]["model.layers.0.self_attn.q_proj"]["scale"] == 2.0
    assert prov["dtype"] == "float16" and prov["version"]


def test_output_files_are_complete(llama_base, tmp_path):
    """config dtype, generation config with several EOS ids, the adapter's own tokenizer and chat template."""
    from transformers import AutoTokenizer

    adapter = make_adapter(llama_base, tmp_path / "adapter", target_modules=["q_proj"])
    tok = AutoTokenizer.from_pretrained(llama_base)
    tok.add_tokens(["<ticket>"])
    tok.chat_template = "{{ messages[0]['content'] }} (adapter template)"
    tok.save_pretrained(adapter)
    out = tmp_path / "out"
    rc, _, stderr = run_cli(
        "merged", "--base", str(llama_base), "--adapter", str(adapter), "--output", str(out), "--dtype", "bfloat16"
    )
    assert rc == 0, stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "adapter_config.json" not in names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert "<ticket>" in merged_tok.get_vocab()
    assert "(adapter template)" in merged_tok.chat_template
    with open(out / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"]["format"] == "pt"


def test_loads_without_peft_installed(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    assert run_cli("merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(out))[0] == 0
    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any import of peft now fails
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r})
        assert m.dtype == torch.float16, m.dtype
        assert not any("lora" in n for n, _ in m.named_parameters())
        print("loaded", type(m).__name__)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "loaded LlamaForCausalLM" in res.stdout


def test_sharded_output_has_index_and_loads(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(
        "merged",
        "--base",
        str(llama_base),
        "--adapter",
        str(llama_adapter),
        "--output",
        str(out),
        "--dtype",
        "float32",
        "--shard-size",
        "1MB",
        "--json",
    )
    assert rc == 0, stderr
    shards = json.loads(stdout)["merge"]["shards"]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in file_tensors(out).values())
    single = tmp_path / "single"
    run_cli(
        "merged",
        "--base",
        str(llama_base),
        "--adapter",
        str(llama_adapter),
        "--output",
        str(single),
        "--dtype",
        "float32",
    )
    a, b = loaded_state(out), loaded_state(single)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_base_is_read_in_order(tmp_path):
    """A hub-style sharded base (index + several files) merges like a single-file one."""
    from helpers import load_base

    base = make_base(tmp_path / "base", "llama")
    sharded = tmp_path / "sharded"
    load_base(base).save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "up_proj"])
    for name, b in (("from-single", base), ("from-sharded", sharded)):
        rc, _, stderr = run_cli(
            "merged",
            "--base",
            str(b),
            "--adapter",
            str(adapter),
            "--output",
            str(tmp_path / name),
            "--dtype",
            "float32",
        )
        assert rc == 0, stderr
    a, b = loaded_state(tmp_path / "from-single"), loaded_state(tmp_path / "from-sharded")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verify_passes_and_reports_the_logit_difference(example, tmp_path):
    out = tmp_path / "merged"
    rc, stdout, stderr = run_cli(
        "merged",
        "--base",
        str(example.base),
        "--adapter",
        str(example.adapters["classify"]),
        "--output",
        str(out),
        "--verify",
        "--json",
    )
    assert rc == 0, stderr
    report = json.loads(stdout)["verify"]
    assert report["passed"] and report["lora_free"] and report["same_tensors"]
    assert report["unchanged_modules"] == [] and report["changed_modules"] == 14
    assert 0 < report["max_logit_diff"] <= report["tolerance"]


def test_verify_catches_a_wrong_merge(example, tmp_path):
    """Verification is not a rubber stamp: a checkpoint that lost the adapter fails it."""
    from lora_deploy.merge import MergeConfig, plan_merge
    from lora_deploy.merge.verify import verify_merge

    wrong = tmp_path / "wrong"
    rc, _, stderr = run_cli(
        "merged", "--base", str(example.base), "--adapter", str(example.adapters["reply"]), "--output", str(wrong)
    )
    assert rc == 0, stderr
    # the plan of a merge of classify into that folder: what was written there is reply's merge instead
    plan = plan_merge(
        MergeConfig(
            base=str(example.base), adapters=(str(example.adapters["classify"]),), output=wrong, dtype="float16",
            force=True,
        )
    )  # fmt: skip
    report = verify_merge(plan)
    assert not report.passed and report.max_logit_diff > report.tolerance


def test_merged_model_answers_like_the_adapter(example, tmp_path):
    from lora_deploy.examples.tiny import greedy_answer

    out = tmp_path / "merged"
    assert (
        run_cli(
            "merged",
            "--base",
            str(example.base),
            "--adapter",
            str(example.adapters["classify"]),
            "--output",
            str(out),
            "--dtype",
            "float32",
        )[0]
        == 0
    )
    base_answer = greedy_answer(example.base)
    merged_answer = greedy_answer(out)
    assert merged_answer == greedy_answer(example.base, adapter=example.adapters["classify"]) == " account"
    assert merged_answer != base_answer


def test_inspect_describes_the_adapter(example):
    rc, stdout, _ = run_cli("inspect", str(example.adapters["reply"]), "--json")
    assert rc == 0
    info = json.loads(stdout)
    assert info["peft_type"] == "LORA" and info["ranks"] == [16] and info["alphas"] == [32.0]
    assert info["scales"] == [2.0] and info["mergeable"] is True and info["lora_modules"] == 14
    assert "q_proj" in info["targets"]
    rc, stdout, _ = run_cli("inspect", str(example.adapters["reply"]))
    assert "mergeable" in stdout and "yes" in stdout


def test_hub_id_not_in_cache_is_a_clear_offline_error(llama_base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    rc, _, stderr = run_cli(
        "merged", "--base", str(llama_base), "--adapter", "someorg/some-lora", "--output", str(tmp_path / "out")
    )
    assert rc == 3 and "someorg/some-lora" in stderr and "cache" in stderr


def test_hub_id_resolves_from_the_local_cache(llama_base, llama_adapter, tmp_path, monkeypatch):
    """A hub id is looked up in huggingface_hub's cache (laid out as `hf download` leaves it), offline."""
    import shutil

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someorg--some-lora" / "snapshots" / commit
    shutil.copytree(llama_adapter, snap)
    (cache / "models--someorg--some-lora" / "refs").mkdir()
    (cache / "models--someorg--some-lora" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    rc, _, stderr = run_cli("merged", "--base", str(llama_base), "--adapter", "someorg/some-lora", "--output", str(out))
    assert rc == 0, stderr
    ad = json.loads((out / "lora_deploy_merge.json").read_text())["adapters"][0]
    assert ad["source"] == "someorg/some-lora" and ad["revision"] == commit


@pytest.mark.slow
def test_memory_does_not_grow_with_the_model(tmp_path):
    """Merging a ~340 MB checkpoint raises peak RSS by far less than the model's size."""
    from helpers import load_base

    base = make_base(
        tmp_path / "base",
        "llama",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=8192,
    )
    load_base(base).save_pretrained(tmp_path / "sharded", max_shard_size="100MB")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"], r=16)
    total = sum(f.stat().st_size for f in (tmp_path / "sharded").glob("*.safetensors"))
    script = textwrap.dedent(f"""
        import resource, json
        import torch, lora_deploy.merge as m
        from pathlib import Path
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m.run_merge(m.MergeConfig(base={str(tmp_path / "sharded")!r}, adapters=({str(adapter)!r},),
                                  output=Path({str(tmp_path / "out")!r}), dtype="float16"))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth": (after - before) * 1024}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    growth = json.loads(res.stdout.strip().splitlines()[-1])["growth"]
    largest = 8192 * 1024 * 4
    assert total > 300e6
    assert growth < 0.35 * total, f"peak grew by {growth / 1e6:.0f} MB for a {total / 1e6:.0f} MB model"
    assert growth < 5 * largest


def test_example_and_generate_commands(example, tmp_path):
    """`lora-deploy example` reports that each adapter answers differently from the base."""
    rc, stdout, stderr = run_cli("example", str(example.root), "--model", "tiny", "--json")
    assert rc == 0, stderr
    answers = json.loads(stdout)["greedy_answers"]
    assert answers["classify"] == " account"
    assert answers["reply"].startswith(" Please reset your password")
    assert answers["base"] != answers["classify"] and answers["base"] != answers["reply"]
    rc, stdout, _ = run_cli(
        "generate",
        str(example.base),
        "--adapter",
        str(example.adapters["classify"]),
        "--prompt",
        "Customer: Where is my invoice?\nAgent:",
        "--json",
    )
    assert rc == 0 and json.loads(stdout)["answer"] == " billing"
