"""`lora-deploy plan`: memory as vLLM allocates it, held to vLLM's own numbers and to arithmetic done by hand.

- Published configs of well-known models (written here as config.json, with a sparse safetensors file whose
  headers carry the real tensor shapes and no data): weights, KV bytes per token and LoRA slots computed by
  hand in each test.
- Real vLLM (CPU build): the KV cache token count it logs for a given VLLM_CPU_KVCACHE_SPACE, on a grouped-query
  model (SmolLM2), sliding-window models (every layer, and alternating) and an MLA model; and the bytes of the
  LoRA slot tensors its engine allocates for two ranks x two max_loras.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_base, require_cpu_build, run_cli

GIB = 1 << 30

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32768,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "torch_dtype": "bfloat16",
}


def sparse_checkpoint(folder: Path, config: dict, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """config.json plus a safetensors file whose header lists ``shapes`` and whose data is a sparse hole."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = {"BF16": 2, "F32": 4}[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


def meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors transformers' own model of ``config`` holds (meta device: shapes only, tied copies once)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[config["model_type"]].from_dict(config))
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def plan_json(*args: str) -> dict:
    code, out, err = run_cli("plan", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    "config,params,kv_per_token",
    [
        # Llama-3.1-8B: 32 x (4096*4096*2 + 1024*4096*2 + 3*4096*14336 + 2*4096) + 2*128256*4096 + 4096 = 8.03B;
        # KV: 32 layers x 2 x 8 heads x 128 x 2 bytes
        (LLAMA_8B, 8_030_261_248, 32 * 2 * 8 * 128 * 2),
        # Llama-3.1-70B: 80 x (8192*8192*2 + 1024*8192*2 + 3*8192*28672 + 2*8192) + 2*128256*8192 + 8192 = 70.55B
        (LLAMA_70B, 70_553_706_496, 80 * 2 * 8 * 128 * 2),
        # Qwen2.5-7B: 28 x (3584*3584*2 + 512*3584*2 + 3584 + 2*512 + 3*3584*18944 + 2*3584) + 2*152064*3584 + 3584
        (QWEN25_7B, 7_615_616_512, 28 * 2 * 4 * 128 * 2),
        # Mixtral-8x7B: 32 x (4096*4096*2 + 1024*4096*2 + 8*3*4096*14336 + 8*4096 + 2*4096) + 2*32000*4096 + 4096
        (MIXTRAL_8X7B, 46_702_792_704, 32 * 2 * 8 * 128 * 2),
    ],
)
def test_plans_from_headers_match_published_parameter_counts(tmp_path, config, params, kv_per_token):
    folder = sparse_checkpoint(tmp_path / "m", config, meta_shapes(config))
    plan = plan_json("--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "8192")
    assert plan["weights_bytes"] == 2 * params and plan["weights_by_dtype"] == {"BF16": 2 * params}
    assert plan["kv_cache_bytes_per_token"] == kv_per_token


def test_70b_needs_two_h100s_for_one_long_sequence_and_four_for_many(tmp_path):
    """Llama-3.1-70B bf16 (131.4 GiB) on H100-80GB at 90%: 71.6 GiB per GPU. TP 2 leaves ~3.8 GiB of KV cache
    (163,840 bytes per token per GPU with 4 KV heads each) = 3 sequences of 8192; 16 need TP 4."""
    folder = sparse_checkpoint(tmp_path / "m", LLAMA_70B, meta_shapes(LLAMA_70B))
    one = plan_json("--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "8192")["gpus"][0]
    assert one["tensor_parallel_size"] == 2 and 1 <= one["max_concurrent_sequences"] <= 4
    many = plan_json("--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "8192", "--concurrency", "16")[
        "gpus"
    ][0]
    assert many["tensor_parallel_size"] == 4 and many["max_concurrent_sequences"] >= 16
    assert "--tensor-parallel-size 4" in many["vllm_flags"]
    # an 8B model fits one L4 (22.5 GiB): 14.96 GiB of weights
    folder8 = sparse_checkpoint(tmp_path / "m8", LLAMA_8B, meta_shapes(LLAMA_8B))
    l4 = plan_json("--base", str(folder8), "--gpu", "L4-24GB", "--max-model-len", "8192")["gpus"][0]
    assert l4["tensor_parallel_size"] == 1 and l4["max_concurrent_sequences"] >= 1


@pytest.mark.parametrize(
    "config,kv_per_token,kinds",
    [
        (QWEN25_7B, 28 * 2 * 4 * 128 * 2, {"full"}),  # use_sliding_window false: no sliding layers
        (MISTRAL_7B, 32 * 2 * 8 * 128 * 2, {"full"}),
        (MIXTRAL_8X7B, 32 * 2 * 8 * 128 * 2, {"full"}),
        (DEEPSEEK_V3, 61 * (512 + 64) * 2, {"mla"}),  # one latent of kv_lora_rank + qk_rope_head_dim per layer
    ],
)
def test_kv_bytes_per_token_of_published_configs(config, kv_per_token, kinds):
    from lora_deploy.plan.shape import kv_bytes_per_token, read_shape

    shape = read_shape(config)
    assert kv_bytes_per_token(shape, 2) == kv_per_token and set(shape.layer_kinds) == kinds


def test_lora_slots_of_llama_8b_by_hand():
    """4 slots x rank 16, bf16. Per slot and rank: each layer's q, k, v, o, gate, up, down give in + out
    (4096+4096, 4096+1024, 4096+1024, 4096+4096, 4096+14336, 4096+14336, 14336+4096 = 81,920), 32 layers;
    the embedding 128,256 + 4,096 and the head 4,096 + 128,256."""
    from lora_deploy.plan.slots import lora_modules, lora_slot_bytes

    per_rank = 32 * 81_920 + (128_256 + 4_096) + (4_096 + 128_256)
    assert lora_slot_bytes(lora_modules(LLAMA_8B), 4, 16, 2) == 4 * 16 * per_rank * 2 == 369_426_432


def test_advice_follows_the_numbers(tmp_path, llama_base, llama_adapter):
    """One adapter: merged. Several adapters with spread traffic: dynamic (one deployment instead of one per
    adapter). One adapter taking 95% of the traffic: merged. The LoRA overhead used is the measured one if given."""
    one = plan_json("--base", str(llama_base), "--adapter", f"a={llama_adapter}", "--gpu", "L4-24GB")["advice"]
    assert one["recommendation"] == "merged"
    args = [
        "--base",
        str(llama_base),
        "--adapter",
        f"a={llama_adapter}",
        "--adapter",
        f"b={llama_adapter}",
        "--adapter",
        f"c={llama_adapter}",
        "--gpu",
        "L4-24GB",
    ]
    spread = plan_json(*args, "--lora-overhead", "0.1")["advice"]
    assert spread["recommendation"] == "dynamic" and spread["merged_gpus"] == 3 and spread["dynamic_gpus"] == 1
    assert spread["lora_overhead"] == 0.1 and "measured" in spread["lora_overhead_source"]
    skewed = plan_json(*args, "--traffic", "a=95", "--traffic", "b=4", "--traffic", "c=1")["advice"]
    assert skewed["recommendation"] == "merged" and "a takes 95%" in skewed["reasons"][0]


def test_spec_check_catches_too_few_gpus_and_passes_a_fitting_spec(tmp_path):
    """`plan --spec`: a 70B spec on one H100 exits 6 naming the tensor parallelism it needs; with 4 GPUs it passes."""
    import yaml

    folder = sparse_checkpoint(tmp_path / "m", LLAMA_70B, meta_shapes(LLAMA_70B))
    spec = {
        "name": "big",
        "model": "/models/llama-70b",
        "mode": "merged",
        "gpus": 1,
        "vllm": {"maxModelLen": 8192},
        "resources": {"memory": "200Gi"},
    }
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = run_cli(
        "plan", "--spec", str(tmp_path / "one.yaml"), "--base", str(folder), "--gpu", "H100-80GB", "--json"
    )
    assert code == 6, err
    assert "needs 2" in json.loads(out)["problems"][0]
    (tmp_path / "four.yaml").write_text(yaml.safe_dump({**spec, "gpus": 4}))
    code, out, err = run_cli(
        "plan", "--spec", str(tmp_path / "four.yaml"), "--base", str(folder), "--gpu", "H100-80GB", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["problems"] == []


DEPLOY = Path(__file__).parents[1] / "deploy"


def _with_store(spec: dict) -> dict:
    """The dynamic example with an adapter store (rank limit 64) and no LoRA limits of its own: the case where the
    plan once sized rank 16 while the servers ran rank 64."""
    return {
        **spec,
        "apiKeySecret": {"name": "key"},
        "vllm": {"maxModelLen": 8192},
        "adapterStore": {"claim": "adapters", "maxLoraRank": 64},
    }


# every committed spec, and the dynamic example with and without a store; (spec, the GPU memory that makes the
# plan's tensor parallelism the spec's own, so every flag can be compared)
FLAG_SPECS = {p.stem: (lambda p=p: __import__("yaml").safe_load(p.read_text())) for p in sorted(DEPLOY.glob("*.yaml"))}
FLAG_SPECS["dynamic-with-store"] = lambda: _with_store(FLAG_SPECS["support-adapters-dynamic"]())
FLAG_SPECS["fleet-without-max-loras"] = lambda: {**FLAG_SPECS["support-fleet"](), "vllm": {"maxModelLen": 8192}}
FLAG_SPECS["dynamic-2gpu"] = lambda: {**FLAG_SPECS["support-adapters-dynamic"](), "gpus": 2}
LORA_FLAGS = ("--enable-lora", "--max-lora-rank", "--max-loras", "--max-cpu-loras", "--fully-sharded-loras")


def _server_args(folder: Path) -> list[str]:
    """The vLLM container's arguments, from the Deployment or the LeaderWorkerSet's leader."""
    import yaml

    if (folder / "deployment.yaml").exists():
        pod = yaml.safe_load((folder / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    else:
        lws = yaml.safe_load((folder / "leaderworkerset.yaml").read_text())
        pod = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    return pod["containers"][0]["args"]


@pytest.mark.parametrize("name", list(FLAG_SPECS))
def test_plan_spec_prints_exactly_the_flags_the_manifests_run(name, tmp_path):
    """One LoRA-limits record: for every committed spec (and a store without limits of its own), every flag `plan
    --spec` prints (but the plan's own --max-num-seqs) is in the rendered server's vLLM arguments with the same value,
    and every LoRA flag the server runs is one the plan sized: the rank limit, slots and CPU cache planned are the
    ones the pods reserve."""
    import yaml

    spec = FLAG_SPECS[name]()
    big = "70b" in spec["model"].lower()
    folder = sparse_checkpoint(
        tmp_path / "m", LLAMA_70B if big else LLAMA_8B, meta_shapes(LLAMA_70B if big else LLAMA_8B)
    )
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # 20 GiB GPUs: the 70B spec's 8 per node x 2 nodes are what it needs; 16 GiB: two for the 8B; 80 GiB: one
    memory = "20" if big else ("16" if spec.get("gpus") == 2 else "80")
    code, out, err = run_cli(
        "plan", "--spec", str(tmp_path / "spec.yaml"), "--base", str(folder), "--gpu-memory", memory, "--json"
    )
    assert code == 0, err
    planned = json.loads(out)["plan"]["gpus"][0]["vllm_flags"]
    code, _, err = run_cli("manifests", str(tmp_path / "spec.yaml"), "--output", str(tmp_path / "out"))
    assert code == 0, err
    args = _server_args(tmp_path / "out")
    for flag in planned:
        flag_name, _, value = flag.partition(" ")
        if flag_name == "--max-num-seqs":
            continue
        assert flag_name in args, (flag, args)
        if value:
            assert args[args.index(flag_name) + 1] == value, (flag, args)
    assert [a for a in args if a in LORA_FLAGS] == [f.split(" ")[0] for f in planned if f.split(" ")[0] in LORA_FLAGS]
    if spec.get("mode") == "dynamic":
        assert "--enable-lora" in planned
    if spec.get("gpus") == 2:  # tensor parallelism brings vLLM's sharded LoRA
        assert {"--tensor-parallel-size 2", "--fully-sharded-loras"} <= set(planned)
    if "adapterStore" in spec:  # the store's limit, and a slot for the adapters it serves at run time
        assert "--max-lora-rank 64" in planned
        loras = spec.get("vllm", {}).get("maxLoras") or len(spec["adapters"]) + 1
        assert f"--max-loras {loras}" in planned


@pytest.mark.parametrize(
    "args,needle",
    [(["--max-lora-rank", "600"], "not one vLLM accepts"), (["--dtype", "fp32"], "--dtype: 'fp32' is not 'auto'")],
)
def test_plan_refuses_flags_vllm_refuses(llama_base, llama_adapter, args, needle):
    code, _, err = run_cli(
        "plan", "--base", str(llama_base), "--adapter", f"a={llama_adapter}", "--gpu", "L4-24GB", *args
    )
    assert code == 3 and needle in err, err


def test_vllm_dtype_names_are_planned_at_their_size(tmp_path):
    """`--dtype float` is vLLM's name for float32 (4 bytes per parameter), `half` for float16."""
    folder = sparse_checkpoint(tmp_path / "m", LLAMA_8B, meta_shapes(LLAMA_8B))
    plans = {
        d: plan_json("--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "4096", "--dtype", d)
        for d in ("float", "float32", "half", "float16")
    }
    assert plans["float"]["dtype"] == plans["float32"]["dtype"] == "float32"
    assert plans["half"]["dtype"] == plans["float16"]["dtype"] == "float16"
    per_gpu = {d: p["gpus"][0]["weights_bytes_per_gpu"] for d, p in plans.items()}
    assert per_gpu["float"] == per_gpu["float32"] == 2 * per_gpu["half"] == 2 * per_gpu["float16"]


def test_plan_spec_names_its_gpu_and_reads_memory_quantities(tmp_path):
    """`plan --spec` without a GPU type is an input error (a spec says how many GPUs, not which); every Kubernetes
    memory quantity (1e11, 200G, 200Gi) is checked, a too-small one warned about; --gpu-memory-utilization counts."""
    import yaml

    folder = sparse_checkpoint(tmp_path / "m", LLAMA_8B, meta_shapes(LLAMA_8B))
    spec = {"name": "one", "model": "/models/llama-8b", "mode": "merged", "gpus": 1, "vllm": {"maxModelLen": 4096}}

    def check(memory, *extra):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({**spec, "resources": {"memory": memory}}))
        code, out, err = run_cli("plan", "--spec", str(tmp_path / "s.yaml"), "--base", str(folder), *extra, "--json")
        return code, (json.loads(out) if out else None), err

    code, _, err = check("64Gi")
    assert code == 3 and "--gpu" in err
    for memory, small in (("64Gi", False), ("1e11", False), ("2G", True), ("2048Mi", True)):
        code, got, err = check(memory, "--gpu", "H100-80GB")
        assert code == 0, err
        assert any("below the weights" in w for w in got["warnings"]) == small, (memory, got["warnings"])
    _, high, _ = check("64Gi", "--gpu", "H100-80GB")
    _, low, _ = check("64Gi", "--gpu", "H100-80GB", "--gpu-memory-utilization", "0.5")
    assert low["plan"]["gpus"][0]["kv_cache_bytes_per_gpu"] < high["plan"]["gpus"][0]["kv_cache_bytes_per_gpu"]


def test_layer_types_come_from_transformers_when_the_config_predates_them():
    """A Gemma-2 hub config without `layer_types` alternates sliding and full layers (transformers' own rule), and
    a Gemma-3 one slides 5 layers of 6; neither is "every layer sliding"."""
    from lora_deploy.plan.shape import read_shape

    gemma2 = {
        "model_type": "gemma2",
        "num_hidden_layers": 42,
        "hidden_size": 3584,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "sliding_window": 4096,
        "vocab_size": 256000,
    }
    assert read_shape(gemma2).layer_kinds == ("sliding", "full") * 21
    gemma3 = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 12,
        "hidden_size": 1152,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "vocab_size": 262144,
    }
    assert read_shape(gemma3).layer_kinds == (("sliding",) * 5 + ("full",)) * 2


def test_float32_checkpoints_are_planned_in_the_dtype_vllm_serves(tmp_path):
    """vLLM's --dtype auto serves a float32 checkpoint in bfloat16: half the weight bytes per GPU, a bf16 KV cache;
    --dtype float32 keeps 4 bytes; an fp8 KV cache halves the bf16 one and its flag is in the command."""
    config = {**LLAMA_8B, "torch_dtype": "float32"}
    folder = sparse_checkpoint(tmp_path / "m", config, meta_shapes(config), "F32")
    auto = plan_json("--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "4096")
    as32 = plan_json("--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "4096", "--dtype", "float32")
    assert auto["dtype"] == "bfloat16" and as32["dtype"] == "float32"
    assert as32["kv_cache_bytes_per_token"] == 2 * auto["kv_cache_bytes_per_token"]
    assert auto["weights_bytes"] == as32["weights_bytes"] == 4 * 8_030_261_248  # the checkpoint, as stored
    assert 2 * auto["gpus"][0]["weights_bytes_per_gpu"] == as32["gpus"][0]["weights_bytes_per_gpu"]
    fp8 = plan_json(
        "--base", str(folder), "--gpu", "H100-80GB", "--max-model-len", "4096", "--kv-cache-dtype", "fp8_e4m3"
    )
    assert 2 * fp8["kv_cache_bytes_per_token"] == auto["kv_cache_bytes_per_token"]
    assert "--kv-cache-dtype fp8_e4m3" in fp8["gpus"][0]["vllm_flags"]


def test_bad_plan_inputs_are_input_errors(llama_base):
    code, _, err = run_cli("plan", "--base", str(llama_base), "--gpu", "H100")
    assert code == 3 and "unknown GPU type" in err and "H100-80GB" in err
    code, _, err = run_cli("plan", "--base", str(llama_base), "--max-model-len", "100000")
    assert code == 3 and "max_position_embeddings" in err
    code, _, err = run_cli("plan")
    assert code == 3 and "--base" in err
    code, _, err = run_cli("plan", "--base", str(llama_base), "--kv-cache-dtype", "fp9")
    assert code == 3 and "fp8_e4m3" in err


# ---------------------------------------------------------------- against real vLLM (CPU build)


def _probe(model: Path, space_gib: int, dtype: str, max_len: int, lora: tuple[int, int] | None = None) -> dict:
    require_cpu_build()
    args = [
        sys.executable,
        str(Path(__file__).parent / "vllm_probe.py"),
        str(model),
        str(space_gib),
        dtype,
        str(max_len),
    ] + ([str(x) for x in lora] if lora else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    found = re.search(r"KV cache size: ([\d,]+) tokens", text)
    assert found, text[-3000:]
    result = json.loads(text.split("PROBE ", 1)[1].splitlines()[0]) if "PROBE " in text else {}
    return {"kv_cache_tokens": int(found.group(1).replace(",", "")), **result}


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    from archs import build_arch

    root = tmp_path_factory.mktemp("kv")
    archs = {arch: build_arch(root / arch, arch) for arch in ("mistral", "gemma2")}
    # both of vllm-cpu's MLA backends take only DeepSeek's own latent size (512 + 64)
    archs["deepseek_v2"] = build_arch(root / "deepseek_v2", "deepseek_v2", kv_lora_rank=512, qk_rope_head_dim=64)
    return archs


def test_kv_cache_tokens_reproduce_vllm_cpu_exactly(real, tiny_archs):
    """vllm-cpu's logged "KV cache size: N tokens", on SmolLM2 (GQA, bf16, 2 GiB, 1000 tokens), Mistral-style
    sliding window on every layer, Gemma-2-style alternating sliding/full layers, and DeepSeek-V2's MLA latent
    cache (128-token blocks and bf16 only on AMX CPUs, where vllm-cpu picks AMX_MLA; 16-token blocks elsewhere, in the
    float32 that ran there before), equals the plan's `kv_cache_tokens` for this CPU."""
    from lora_deploy.plan.shape import kv_cache_tokens, read_shape
    from lora_deploy.serve.flags import cpu_has_amx

    mla_dtype = "bfloat16" if cpu_has_amx() else "float32"
    cases = [
        (real.base, 2, "bfloat16", 1000),
        (tiny_archs["mistral"], 1, "float32", 100),
        (tiny_archs["gemma2"], 1, "float32", 100),
        (tiny_archs["deepseek_v2"], 1, mla_dtype, 100),
    ]
    measured = {}
    for model, space, dtype, max_len in cases:
        measured[model] = vllm_tokens = _probe(model, space, dtype, max_len)["kv_cache_tokens"]
        shape = read_shape(json.loads((Path(model) / "config.json").read_text()))
        ours = kv_cache_tokens(shape, space, max_len, kv_dtype_bytes={"bfloat16": 2, "float32": 4}[dtype])
        assert ours == vllm_tokens, (model, ours, vllm_tokens)
    plan = plan_json("--base", str(real.base), "--kv-cache-gib", "2", "--max-model-len", "1000", "--gpu", "L4-24GB")
    assert plan["kv_cache_tokens"] == measured[real.base]
    mla = read_shape(json.loads((tiny_archs["deepseek_v2"] / "config.json").read_text()))
    # the other CPU kind, by vLLM's block sizes: 16-token blocks hold more whole requests of 100 tokens
    assert kv_cache_tokens(mla, 1, 100, kv_dtype_bytes=2, amx=False) > kv_cache_tokens(
        mla, 1, 100, kv_dtype_bytes=2, amx=True
    )


def test_a_qwen2_config_with_sliding_layer_types_is_planned_as_vllm_serves_it():
    """vLLM's Qwen2 gives no layer its own window: a config whose layer_types alternate is served (and planned) with
    full attention on every layer (measured on vllm-cpu 0.32: 524,288 tokens, the all-full count)."""
    from lora_deploy.plan.shape import read_shape

    config = {
        "model_type": "qwen2",
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 64,
        "use_sliding_window": True,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    assert read_shape(config).layer_kinds == ("full",) * 4
    assert read_shape({**config, "model_type": "gemma2"}).layer_kinds == ("sliding", "full") * 2


@pytest.mark.parametrize("max_loras,rank", [(1, 8), (1, 16), (2, 8), (2, 16)])
def test_lora_slot_bytes_equal_the_tensors_vllm_allocates(tmp_path, max_loras, rank):
    """The plan's LoRA slot memory equals the bytes of every LoRA tensor in vllm-cpu's engine (embedding, every
    linear slice, the logits processor) for two ranks x two max_loras."""
    base = make_base(tmp_path / "base", "llama", tokenizer=True, hidden_size=128, intermediate_size=256)
    allocated = _probe(base, 1, "float32", 128, (max_loras, rank))["lora_bytes"]
    plan = plan_json(
        "--base",
        str(base),
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(rank),
        "--gpu",
        "L4-24GB",
        "--dtype",
        "float32",
    )
    assert plan["lora_slot_bytes"] == allocated > 0


def test_manifests_size_what_the_spec_does_not_say_from_the_plan(tmp_path):
    """`manifests --size-for H100-80GB`: a 70B spec without gpus or memory gets 2 GPUs, tensor parallelism 2,
    its max model len and a pod memory above the weights it loads; keys the spec sets stay as they are; and the
    output still passes the Kubernetes schema validation that every render goes through."""
    import yaml

    folder = sparse_checkpoint(tmp_path / "m", LLAMA_70B, meta_shapes(LLAMA_70B))
    spec = {"name": "big", "model": "/models/llama-70b", "mode": "merged", "vllm": {"maxModelLen": 8192}}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(
        "manifests",
        str(tmp_path / "big.yaml"),
        "--output",
        str(tmp_path / "out"),
        "--size-for",
        "H100-80GB",
        "--base",
        str(folder),
    )
    assert code == 0, err
    deployment = yaml.safe_load((tmp_path / "out" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"
    assert int(limits["memory"].removesuffix("Gi")) >= 131.42 * 1.25  # the weights a pod reads, with headroom
    args = container.get("args", []) + container.get("command", [])
    assert "--tensor-parallel-size" in args and args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "8192"
    (tmp_path / "given.yaml").write_text(yaml.safe_dump({**spec, "gpus": 4, "resources": {"memory": "300Gi"}}))
    code, _, err = run_cli(
        "manifests",
        str(tmp_path / "given.yaml"),
        "--output",
        str(tmp_path / "given"),
        "--size-for",
        "H100-80GB",
        "--base",
        str(folder),
    )
    assert code == 0, err
    limits = yaml.safe_load((tmp_path / "given" / "deployment.yaml").read_text())["spec"]["template"]["spec"][
        "containers"
    ][0]["resources"]["limits"]
    assert limits == {"memory": "300Gi", "nvidia.com/gpu": "4"}
