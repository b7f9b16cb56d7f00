"""Our streaming merge against PEFT's merge_and_unload(), feature by feature, tensor by tensor."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import check_against_oracle, file_tensors, loaded_state, make_adapter, make_base, peft_merged_state
from lora_deploy.merge import MergeConfig, run_merge

# (id, arch, base overrides, LoraConfig kwargs, extra: resize / save kwargs)
CASES = [
    ("linear", "llama", {}, dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]), {}),
    ("rslora", "llama", {}, dict(target_modules=["q_proj", "k_proj"], use_rslora=True, r=8, lora_alpha=4), {}),
    (
        "rank-alpha-pattern",
        "llama",
        {},
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            r=4,
            lora_alpha=8,
            rank_pattern={"v_proj": 8, r"layers\.1\.self_attn\.q_proj": 2},
            alpha_pattern={"up_proj": 32, "q_proj": 3},
        ),
        {},
    ),
    ("layers-to-transform", "llama", {}, dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]), {}),
    ("regex-targets", "llama", {}, dict(target_modules=r".*\.layers\.0\.mlp\.(gate|up)_proj"), {}),
    ("dora", "llama", {}, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), {}),
    ("modules-to-save", "llama", {}, dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), {}),
    (
        "modules-to-save-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        {"tied": False},
    ),
    # the silent breakage: an untied config with no lm_head tensor (transformers initialised it randomly)
    (
        "modules-to-save-embedding-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        {"tied": False},
    ),
    (
        "modules-to-save-both-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        {"tied": False},
    ),
    ("embedding-lora", "llama", {}, dict(target_modules=["embed_tokens", "q_proj"]), {}),
    # PEFT's merge writes a one-sided LoRA into the shared storage, changing both sides: we follow the unmerged model
    (
        "embedding-lora-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["embed_tokens"]),
        {"peft_right": False, "tied": False},
    ),
    (
        "head-lora-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["lm_head", "q_proj"]),
        {"peft_right": False, "tied": False},
    ),
    (
        "embedding-lora-ensure-tying",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["embed_tokens"], ensure_weight_tying=True),
        {"peft_right": False, "tied": True},
    ),
    (
        "resized-vocab-modules-to-save-both",
        "llama",
        {},
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        {"resize": 520, "save_kwargs": {"save_embedding_layers": True}},
    ),
    ("embedding-dora", "llama", {}, dict(target_modules=["embed_tokens"], use_dora=True), {}),
    (
        "resized-vocab",
        "llama",
        {},
        dict(target_modules=["q_proj"]),
        {"resize": 520, "save_kwargs": {"save_embedding_layers": True}},
    ),
    (
        "resized-vocab-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["q_proj"]),
        {"resize": 530, "save_kwargs": {"save_embedding_layers": True}, "tied": True},
    ),
    ("trainable-tokens", "llama", {}, dict(target_modules=["q_proj"], trainable_token_indices=[3, 7, 100]), {}),
    (
        "trainable-tokens-tied",
        "llama",
        {"tie_word_embeddings": True},
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [5, 9]}),
        {},
    ),
    ("bias-lora-only", "qwen2", {}, dict(target_modules=["q_proj", "k_proj"], bias="lora_only"), {}),
    ("bias-all", "qwen2", {}, dict(target_modules=["q_proj"], bias="all"), {}),
    ("lora-bias", "qwen2", {}, dict(target_modules=["q_proj", "v_proj"], lora_bias=True), {}),
    ("gpt2-conv1d", "gpt2", {}, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), {}),
    ("gpt2-conv1d-dora", "gpt2", {}, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True), {}),
    ("phi3-fused", "phi3", {}, dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj"]), {}),
    ("mistral", "mistral", {}, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), {}),
    ("qwen2", "qwen2", {}, dict(target_modules=["q_proj", "v_proj", "gate_proj"]), {}),
]


def _merge(base, adapters, out, **kw):
    return run_merge(MergeConfig(base=str(base), adapters=tuple(str(a) for a in adapters), output=out, **kw))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    cache = {}

    def get(arch, overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_base(tmp_path_factory.mktemp(arch) / "base", arch, **overrides)
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float32_merge_equals_the_unmerged_model(case, bases, tmp_path):
    """Every feature: logits equal the unmerged PEFT model's, tensors equal PEFT's merge where PEFT is right."""
    _, arch, overrides, lora, extra = case
    base = bases(arch, overrides)
    adapter = make_adapter(
        base, tmp_path / "adapter", resize=extra.get("resize"), save_kwargs=extra.get("save_kwargs"), **lora
    )
    report = _merge(base, [adapter], tmp_path / "out", dtype="float32")
    peft_right = check_against_oracle(base, [adapter], tmp_path / "out", report, resize=extra.get("resize"))
    assert peft_right == (extra.get("peft_right", True)), "PEFT's merge changed: update the table"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32"
    if extra.get("resize"):
        assert config["vocab_size"] == extra["resize"]
    if "tied" in extra:
        assert config["tie_word_embeddings"] is extra["tied"]
        assert ("lm_head.weight" in file_tensors(tmp_path / "out")) is not extra["tied"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case_id", ["linear", "dora", "gpt2-conv1d", "embedding-lora"])
def test_half_precision_is_correctly_rounded(case_id, dtype, bases, tmp_path):
    """fp16/bf16 outputs are PEFT's float32 result rounded once (PEFT on a half base rounds twice)."""
    _, arch, overrides, lora, _ = next(c for c in CASES if c[0] == case_id)
    base = bases(arch, overrides)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    _merge(base, [adapter], tmp_path / "out", dtype=dtype)
    expected = peft_merged_state(base, [adapter])
    ours = file_tensors(tmp_path / "out")
    target = getattr(torch, dtype)
    for name, t in ours.items():
        assert t.dtype == target, name
        assert torch.equal(t, expected[name].to(target)), f"{name} is not the correctly rounded value"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == dtype


def test_merge_is_more_exact_than_peft_on_a_half_precision_base(tmp_path):
    """The common recipe (bf16 base, adapter kept in bf16) rounds dW before adding it; we round W + dW once."""
    from peft import PeftModel

    from helpers import load_base

    base = make_base(tmp_path / "base16", "llama", dtype="bfloat16")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=64)
    _merge(base, [adapter], tmp_path / "out", dtype="bfloat16")
    ours = file_tensors(tmp_path / "out")
    base_t, ad = file_tensors(base), file_tensors(adapter)
    model = load_base(base).to(torch.bfloat16)
    peft_state = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload().state_dict()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    name = "model.layers.0.self_attn.q_proj.weight"
    a = ad[f"{prefix}.lora_A.weight"].double()
    b = ad[f"{prefix}.lora_B.weight"].double()
    exact = base_t[name].double() + 8.0 * (b @ a)  # lora_alpha / r = 64 / 8
    err_ours = (ours[name].double() - exact).abs().sum()
    err_peft = (peft_state[name].double() - exact).abs().sum()
    assert err_ours < err_peft
    correctly_rounded = (ours[name] == exact.to(torch.bfloat16)).double().mean()
    assert correctly_rounded > 0.999


def test_weighted_adapters_are_the_exact_sum(bases, tmp_path):
    """--adapter a --adapter b --weights 0.7,0.3 writes W + 0.7 dWa + 0.3 dWb (PEFT's exact 'cat' combination)."""
    base = bases("llama", {})
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"], r=4)
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj", "down_proj"], r=8, lora_alpha=4)
    report = _merge(base, [a, b], tmp_path / "out", dtype="float32", weights=(0.7, 0.3))
    check_against_oracle(base, [a, b], tmp_path / "out", report, weights=[0.7, 0.3])
    expected = peft_merged_state(base, [a, b], [0.7, 0.3])
    ours = loaded_state(tmp_path / "out")
    for name, ref in expected.items():
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # and it is not PEFT's "linear" combination, which scales A and B by sqrt(w) separately
    provenance = json.loads((tmp_path / "out" / "lora_deploy_merge.json").read_text())
    assert [x["weight"] for x in provenance["adapters"]] == [0.7, 0.3]


def test_logits_equal_unmerged_peft_model(llama_base, llama_adapter, tmp_path):
    """The merged checkpoint, loaded by plain transformers, computes the PEFT model's logits."""
    from peft import PeftModel

    from helpers import load_base

    _merge(llama_base, [llama_adapter], tmp_path / "out", dtype="float32")
    merged = load_base(tmp_path / "out").eval()
    pm = PeftModel.from_pretrained(load_base(llama_base), llama_adapter).eval()
    ids = torch.tensor([[1, 5, 17, 99, 250, 3, 42]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
