"""Merges on many architecture families, judged by the unmerged PEFT model (see helpers.check_against_oracle).

Bases come from transformers' own config classes and ``save_pretrained`` (so MoE checkpoints are in the
per-expert layout transformers writes, GPT-NeoX's head is ``embed_out`` on disk); adapters from PEFT with
``init_lora_weights=False``. The configurations are PEFT's own: all-linear, target_parameters on fused MoE
experts, weighted mixes with a rank pattern, modules_to_save on tied embeddings.
"""

from __future__ import annotations

import json

import pytest
import torch

from archs import build_arch
from helpers import check_against_oracle, file_tensors, make_adapter
from lora_deploy.merge import MergeConfig, run_merge

DENSE = [
    "llama",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "gpt_neox",
    "gptj",
    "falcon",
    "opt",
    "bloom",
    "phi",
    "starcoder2",
    "cohere",
    "glm4",
    "gpt_bigcode",
    "granite",
    "stablelm",
]
MOE = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "granitemoe"]
EXPERTS = {"granitemoe": ["experts.gate_up_proj", "experts.down_proj"]}  # the others: mlp.experts.*


def _experts(model_type):
    return EXPERTS.get(model_type, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def _merge(base, adapters, out, **kw):
    return run_merge(MergeConfig(base=str(base), adapters=tuple(str(a) for a in adapters), output=out, **kw))


@pytest.fixture(scope="module")
def arch_base(tmp_path_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = build_arch(tmp_path_factory.mktemp(model_type) / "base", model_type)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", DENSE + MOE)
def test_all_linear_adapter_merges_exactly(model_type, arch_base, tmp_path):
    """target_modules="all-linear" (on MoE models PEFT turns part of it into target_parameters on the experts)."""
    base = arch_base(model_type)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    report = _merge(base, [adapter], tmp_path / "out", dtype="float32")
    assert report.tensors_changed > 0
    check_against_oracle(base, [adapter], tmp_path / "out", report)


@pytest.mark.parametrize("model_type", MOE)
def test_lora_on_fused_experts_merges_exactly(model_type, arch_base, tmp_path):
    """target_parameters on gate_up_proj and down_proj of every MoE layer, written into the base's layout."""
    base = arch_base(model_type)
    adapter = make_adapter(base, tmp_path / "adapter", target_parameters=_experts(model_type), lora_dropout=0.0)
    report = _merge(base, [adapter], tmp_path / "out", dtype="float32")
    check_against_oracle(base, [adapter], tmp_path / "out", report)
    experts = {m["experts"] for a in report.adapters for m in a["modules"].values() if "experts" in m}
    assert experts == {4}
    # the base's own tensor names and layout, nothing else
    assert sorted(file_tensors(tmp_path / "out")) == sorted(file_tensors(base))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_weighted_expert_adapters_with_a_rank_pattern(model_type, arch_base, tmp_path):
    """W + 0.7 dWa - 0.4 dWb on per-expert checkpoint tensors; b has a rank_pattern on gate_up_proj."""
    from peft import PeftModel

    from helpers import loaded_state

    base = arch_base(model_type)
    targets = _experts(model_type)
    a = make_adapter(base, tmp_path / "a", seed=1, target_parameters=targets, r=4, lora_alpha=8)
    b = make_adapter(
        base,
        tmp_path / "b",
        seed=2,
        target_parameters=targets,
        r=2,
        lora_alpha=3,
        use_rslora=True,
        rank_pattern={"gate_up_proj": 6},
    )
    _merge(base, [a, b], tmp_path / "out", dtype="float32", weights=(0.7, -0.4))
    # PEFT cannot combine target_parameters adapters (add_weighted_adapter refuses), so the oracle is built from
    # its own per-adapter merges: W + 0.7 (Wa - W) - 0.4 (Wb - W), every tensor
    from helpers import load_base

    w0 = {k: v.detach().clone() for k, v in load_base(base).state_dict().items()}
    merged = []
    for ad in (a, b):
        merged.append(
            {
                k: v.detach()
                for k, v in PeftModel.from_pretrained(load_base(base), ad).merge_and_unload().state_dict().items()
            }
        )
    ours_model = loaded_state(tmp_path / "out")
    changed = 0
    for k, w in w0.items():
        want = w + 0.7 * (merged[0][k] - w) - 0.4 * (merged[1][k] - w)
        torch.testing.assert_close(ours_model[k], want, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        changed += not torch.equal(want, w)
    assert changed >= 4


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gpt_neox"])
def test_modules_to_save_on_the_embedding(model_type, arch_base, tmp_path):
    """Tied families (Gemma) keep the head as the unmerged model computes it; GPT-NeoX's untied embed_in."""
    base = arch_base(model_type)
    emb = "embed_in" if model_type == "gpt_neox" else "embed_tokens"
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        target_modules=["dense" if model_type == "gpt_neox" else "o_proj"],
        modules_to_save=[emb],
    )
    report = _merge(base, [adapter], tmp_path / "out", dtype="float32")
    check_against_oracle(base, [adapter], tmp_path / "out", report)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if json.loads((base / "config.json").read_text()).get("tie_word_embeddings"):
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in file_tensors(tmp_path / "out")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_expert_merges_are_rounded_once(dtype, arch_base, tmp_path):
    """Half-precision output of an expert merge is the float32 merge rounded once, tensor by tensor."""
    base = arch_base("mixtral")
    adapter = make_adapter(base, tmp_path / "adapter", target_parameters=_experts("mixtral"))
    _merge(base, [adapter], tmp_path / "f32", dtype="float32")
    _merge(base, [adapter], tmp_path / "half", dtype=dtype)
    full, half = file_tensors(tmp_path / "f32"), file_tensors(tmp_path / "half")
    for k, t in half.items():
        assert torch.equal(t, full[k].to(getattr(torch, dtype))), k


# The failure classes an outside survey of 43 bases x PEFT's configurations found in the previous engine:
# one-sided LoRA on tied embeddings (silently wrong), ensure_weight_tying (delta added twice), both tied sides
# targeted (refused), renamed heads and routers (refused). (model type, config overrides, LoraConfig kwargs)
SURVEY = [
    ("gpt2", {}, dict(target_modules=["wte"])),
    ("qwen3", {"tie_word_embeddings": True}, dict(target_modules=["lm_head"])),
    ("gemma", {}, dict(target_modules=["embed_tokens", "lm_head"])),
    ("gemma", {}, dict(target_modules=["model.embed_tokens", "lm_head"], ensure_weight_tying=True)),
    ("gpt_neox", {}, dict(target_modules=["lm_head", "query_key_value"])),
    ("mixtral", {}, dict(target_modules=[], target_parameters=["mlp.gate.weight"])),
    ("granitemoe", {}, dict(target_modules=["q_proj"], target_parameters=["router.weight"])),
]


@pytest.mark.parametrize(
    "model_type,overrides,lora", SURVEY, ids=[f"{m}-{'-'.join(k for k in lo)}" for m, _, lo in SURVEY]
)
def test_configurations_the_survey_found_broken(model_type, overrides, lora, tmp_path):
    base = build_arch(tmp_path / "base", model_type, **overrides)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    report = _merge(base, [adapter], tmp_path / "out", dtype="float32")
    check_against_oracle(base, [adapter], tmp_path / "out", report)


@pytest.mark.parametrize("model_type", DENSE + MOE + ["gpt2"])
def test_expected_tensors_match_what_transformers_saves(model_type, arch_base):
    """The completeness check accepts every checkpoint transformers itself wrote (fused or per-expert layout)."""
    from lora_deploy.model.layout import expected_tensors

    base = arch_base(model_type)
    expected = expected_tensors(json.loads((base / "config.json").read_text()))
    assert expected is not None and expected.problems(file_tensors(base)) == []


def test_a_plan_that_would_write_an_incomplete_checkpoint_is_refused(arch_base, tmp_path, monkeypatch):
    """The old silent failure: untie a tied model but write no head. Refused before anything is written."""
    from lora_deploy.errors import UnsupportedError
    from lora_deploy.merge import plan as plan_module

    base = arch_base("gemma")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["o_proj"], modules_to_save=["embed_tokens"])
    finish = plan_module._Planner.finish

    def without_head(self, config):
        tensors, out_config = finish(self, config)
        return tuple(t for t in tensors if t.name != "lm_head.weight"), out_config

    monkeypatch.setattr(plan_module._Planner, "finish", without_head)
    with pytest.raises(UnsupportedError, match="missing tensor lm_head.weight"):
        _merge(base, [adapter], tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
