"""Tied input/output embeddings (Gemma-3): the merged checkpoint computes what the unmerged PEFT model computes.

Cases from PEFT's own tables on a tiny Gemma3ForCausalLM (``tie_word_embeddings=True``, no ``lm_head.weight`` in
the base file). The oracle is the unmerged PEFT model in float32; the checks also pin down the written config
and tensor names, and what PEFT's own ``merge_and_unload()`` gives in each case:

- ``ensure_weight_tying`` + ``modules_to_save`` (either side): PEFT points the head at the input embedding's
  trained copy, so the model stays tied. The merge keeps the tie: one tensor, the base's size.
- ``ensure_weight_tying`` + DoRA on the embedding: the head shares the LoRA factors but has its own DoRA
  magnitude (per vocabulary row) where the input embedding's is per hidden column, so the two sides differ.
  Written untied; PEFT's merge stacks both DoRAs into the one shared weight and is wrong for both sides.
- Without ``ensure_weight_tying`` only the targeted side changes: written untied (PEFT's merge of a LoRA/DoRA
  on one side changes both sides; of a ``modules_to_save`` copy it is right).
"""

from __future__ import annotations

import json

import pytest
import torch

from archs import VOCAB, build_arch
from helpers import file_tensors, loaded_model, logits_of, make_adapter, peft_model, run_cli
from lora_deploy.merge import MergeConfig, run_merge

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny random Gemma-3 text model whose checkpoint stores the tied embedding once."""
    base = build_arch(tmp_path_factory.mktemp("gemma3") / "base", "gemma3_text")
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    assert HEAD not in file_tensors(base)
    return base


def _merge(base, adapter, out):
    return run_merge(MergeConfig(base=str(base), adapters=(str(adapter),), output=out, dtype="float32"))


def _tolerance(want: torch.Tensor) -> float:
    """Float32 rounding at the logits' scale: 1e-4 of the peak logit (a wrong head is off by whole units)."""
    return 1e-4 * max(1.0, float(want.abs().max()))


def _unmerged_logits(base, adapter) -> torch.Tensor:
    """The oracle, after checking the adapter changes the model at all (else the test proves nothing)."""
    from helpers import load_base

    want = logits_of(peft_model(base, [adapter]), VOCAB)
    assert (want - logits_of(load_base(base).eval(), VOCAB)).abs().max() > 100 * _tolerance(want), (
        "the adapter barely changes the model: the test would prove nothing"
    )
    return want


def _assert_equals_unmerged(base, adapter, out) -> torch.Tensor:
    want = _unmerged_logits(base, adapter)
    got = logits_of(loaded_model(out), VOCAB)  # loaded_model fails on any missing or unexpected tensor
    diff = float((got - want).abs().max())
    assert diff <= _tolerance(want), (
        f"merged logits differ from the unmerged PEFT model by {diff:.4g} (peak {float(want.abs().max()):.4g})"
    )
    return want


def _peft_merge_error(base, adapter, want) -> float:
    """How far PEFT's own merge_and_unload() is from its unmerged model (in logits), and whether it stays tied."""
    merged = peft_model(base, [adapter]).merge_and_unload()
    return float((logits_of(merged, VOCAB) - want).abs().max())


def _written(out) -> tuple[dict, dict]:
    return json.loads((out / "config.json").read_text()), file_tensors(out)


# ------------------------------------------------------------------ ensure_weight_tying + modules_to_save
@pytest.mark.parametrize(
    "saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]], ids=["embed_tokens", "lm_head", "both"]
)
def test_modules_to_save_with_ensure_weight_tying_keeps_the_tie(saved, gemma3, tmp_path):
    """One trained matrix serves input and output in the unmerged model: one tensor, tie kept, the base's size."""
    adapter = make_adapter(
        gemma3, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=saved, ensure_weight_tying=True
    )
    stored = file_tensors(adapter)
    assert f"base_model.model.{HEAD}" in stored and f"base_model.model.{EMB}" in stored  # PEFT saves both names
    report = _merge(gemma3, adapter, tmp_path / "out")
    want = _assert_equals_unmerged(gemma3, adapter, tmp_path / "out")
    config, tensors = _written(tmp_path / "out")
    assert config["tie_word_embeddings"] is True and report.tie_word_embeddings is True
    assert sorted(tensors) == sorted(file_tensors(gemma3)), "no extra lm_head.weight: same names as the base"
    assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in file_tensors(gemma3).values())
    assert torch.equal(tensors[EMB], stored[f"base_model.model.{EMB}"]), "the trained copy, bit for bit"
    assert not report.peft_differs
    assert _peft_merge_error(gemma3, adapter, want) <= _tolerance(want), "PEFT's merge agrees here"


def test_tied_copies_that_differ_are_refused(gemma3, tmp_path):
    """PEFT keeps the two names in one storage; a file where they differ has no single meaning: exit 3."""
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(
        gemma3,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens"],
        ensure_weight_tying=True,
    )
    state = load_file(adapter / "adapter_model.safetensors")
    state[f"base_model.model.{HEAD}"] = state[f"base_model.model.{HEAD}"] + 0.01
    save_file(state, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(
        "merged",
        "--base",
        str(gemma3),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "out"),
        "--dtype",
        "float32",
    )
    assert code == 3, err
    assert "tied embeddings" in err and HEAD in err and "save_pretrained" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ without ensure_weight_tying: untied
@pytest.mark.parametrize("saved,changed,kept", [("embed_tokens", EMB, HEAD), ("lm_head", HEAD, EMB)])
def test_modules_to_save_without_ensure_weight_tying_unties(saved, changed, kept, gemma3, tmp_path):
    """The healthy direction: a copy of one side changes only that side in the unmerged model, so both are
    written and the tie is dropped; the other side keeps the base embedding."""
    adapter = make_adapter(gemma3, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=[saved])
    _merge(gemma3, adapter, tmp_path / "out")
    want = _assert_equals_unmerged(gemma3, adapter, tmp_path / "out")
    config, tensors = _written(tmp_path / "out")
    assert config["tie_word_embeddings"] is False and HEAD in tensors
    assert torch.equal(tensors[kept], file_tensors(gemma3)[EMB])
    assert not torch.equal(tensors[changed], file_tensors(gemma3)[EMB])
    assert _peft_merge_error(gemma3, adapter, want) <= _tolerance(want), "PEFT's merge agrees here"


# ------------------------------------------------------------------ DoRA on a tied embedding
@pytest.mark.parametrize(
    "targets",
    [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head", "q_proj"]],
    ids=["embed_tokens", "lm_head", "both-and-q_proj"],
)
def test_dora_with_ensure_weight_tying_is_written_untied(targets, gemma3, tmp_path):
    """The head shares the LoRA factors but rescales per vocabulary row with its own magnitude, the input per
    hidden column: two different matrices. Written untied, equal to the unmerged model; PEFT's merge is not."""
    adapter = make_adapter(
        gemma3, tmp_path / "adapter", target_modules=targets, use_dora=True, ensure_weight_tying=True
    )
    stored = file_tensors(adapter)
    assert stored[f"base_model.model.{HEAD[: -len('.weight')]}.lora_magnitude_vector"].shape == (VOCAB,)
    report = _merge(gemma3, adapter, tmp_path / "out")
    want = _assert_equals_unmerged(gemma3, adapter, tmp_path / "out")
    config, tensors = _written(tmp_path / "out")
    assert config["tie_word_embeddings"] is False and report.tie_word_embeddings is False
    assert sorted(tensors) == sorted([*file_tensors(gemma3), HEAD])
    assert not torch.allclose(tensors[HEAD], tensors[EMB], atol=1e-3)
    assert any("DoRA with ensure_weight_tying" in n for n in report.peft_differs)
    # PEFT's merge_and_unload() merges the head's DoRA on top of the embedding's into the one shared weight
    assert _peft_merge_error(gemma3, adapter, want) > 10 * _tolerance(want), "PEFT's merge changed: update the doc"


def test_dora_on_a_tied_embedding_without_ensure_weight_tying(gemma3, tmp_path):
    """The healthy direction: DoRA on the input embedding only; the head keeps the base embedding, untied."""
    adapter = make_adapter(gemma3, tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"], use_dora=True)
    report = _merge(gemma3, adapter, tmp_path / "out")
    want = _assert_equals_unmerged(gemma3, adapter, tmp_path / "out")
    config, tensors = _written(tmp_path / "out")
    assert config["tie_word_embeddings"] is False
    assert torch.equal(tensors[HEAD], file_tensors(gemma3)[EMB])
    assert report.peft_differs, "PEFT's merge writes the DoRA embedding into the head too, and the report says so"
    assert _peft_merge_error(gemma3, adapter, want) > 10 * _tolerance(want)


def test_lora_with_ensure_weight_tying_stays_tied(gemma3, tmp_path):
    """Plain LoRA + ensure_weight_tying: one delta on the shared weight, applied once (PEFT's merge adds it twice)."""
    adapter = make_adapter(gemma3, tmp_path / "adapter", target_modules=["embed_tokens"], ensure_weight_tying=True)
    _merge(gemma3, adapter, tmp_path / "out")
    want = _assert_equals_unmerged(gemma3, adapter, tmp_path / "out")
    config, tensors = _written(tmp_path / "out")
    assert config["tie_word_embeddings"] is True and sorted(tensors) == sorted(file_tensors(gemma3))
    assert _peft_merge_error(gemma3, adapter, want) > 10 * _tolerance(want)


@pytest.mark.parametrize("damage", ["drop-head", "edit-head-factor"])
def test_inconsistent_dora_tying_is_refused(damage, gemma3, tmp_path):
    """A DoRA ensure_weight_tying adapter without the head's magnitude, or whose head factors are not the
    embedding's, has no defined unmerged model: refused with exit 3 before anything is written."""
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(
        gemma3, tmp_path / "adapter", target_modules=["embed_tokens"], use_dora=True, ensure_weight_tying=True
    )
    state = load_file(adapter / "adapter_model.safetensors")
    head = "base_model.model.lm_head."
    if damage == "drop-head":
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    else:
        state[head + "lora_A.weight"] = state[head + "lora_A.weight"] * 1.5
    save_file(state, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(
        "merged",
        "--base",
        str(gemma3),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "out"),
        "--dtype",
        "float32",
    )
    assert code == 3, err
    assert (
        "no DoRA magnitude for the tied lm_head.weight" if damage == "drop-head" else "lm_head.lora_A.weight"
    ) in err
    assert not (tmp_path / "out").exists()
