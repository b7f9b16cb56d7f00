"""Check a merged checkpoint against the base and the unmerged PEFT model (``merged --verify``).

This loads whole models (the base with PEFT, and the merged output) in float32, so it is opt-in.
It proves four things: no LoRA tensors remain, the tensor names and shapes are the base's, every
targeted weight changed, and the merged model's logits equal the unmerged PEFT model's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .shards import ShardIndex, load_tensor

DEFAULT_PROMPTS = ("Customer: I lost my password.\nAgent:", "The quick brown fox", "Hello, how are you today?")
# logits tolerance relative to the largest logit, by output dtype (one rounding of each weight)
RTOL = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of every verification check, with the measured logit difference."""

    passed: bool
    lora_free: bool
    same_tensors: bool
    changed_modules: int
    unchanged_modules: list[str]
    max_logit_diff: float | None
    max_logit: float | None
    tolerance: float | None
    greedy_match: bool | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_merge(output: Path, base: Path, adapters: list[Path], weights: list[float], *, dtype: str,
                 expected_changes: list[str], allowed_new: set[str] = frozenset(),
                 prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> VerifyReport:
    """Verify ``output`` (a merge of ``adapters`` with ``weights`` into ``base``)."""
    problems: list[str] = []
    notes: list[str] = []
    out_index, base_index = ShardIndex.from_folder(output), ShardIndex.from_folder(base)
    lora_names = [n for n in out_index.tensors if "lora" in n or "base_layer" in n or "modules_to_save" in n]
    if (output / "adapter_config.json").exists():
        lora_names.append("adapter_config.json")
    if lora_names:
        problems.append(f"LoRA leftovers in the output: {', '.join(lora_names[:5])}")
    base_shapes = {n: e.shape for n, e in base_index.tensors.items()}
    out_shapes = {n: e.shape for n, e in out_index.tensors.items()}
    missing = sorted(set(base_shapes) - set(out_shapes))
    extra = sorted(set(out_shapes) - set(base_shapes) - set(allowed_new))
    reshaped = sorted(n for n in set(base_shapes) & set(out_shapes)
                      if base_shapes[n] != out_shapes[n] and n not in allowed_new)
    for label, names in (("missing", missing), ("unexpected", extra), ("reshaped", reshaped)):
        if names:
            problems.append(f"{label} tensors: {', '.join(names[:5])}")
    unchanged = []
    for name in expected_changes:
        if name in out_index.tensors and name in base_index.tensors:
            a, b = load_tensor(out_index.tensors[name]).float(), load_tensor(base_index.tensors[name]).float()
            if a.shape == b.shape and bool((a == b).all()):
                unchanged.append(name)
    if unchanged:
        problems.append(f"{len(unchanged)} targeted tensor(s) did not change: {', '.join(unchanged[:5])}")
    diff, peak, tol, greedy = _compare_logits(output, base, adapters, weights, dtype, prompts, notes)
    if diff is not None and diff > tol:
        problems.append(f"logits differ from the unmerged PEFT model by {diff:.3g} (tolerance {tol:.3g})")
    if greedy is False:
        problems.append("the greedy next token differs from the unmerged PEFT model's where its top two logits are "
                        "clearly apart")
    return VerifyReport(not problems, not lora_names, not (missing or extra or reshaped),
                        len(expected_changes) - len(unchanged), unchanged, diff, peak, tol, greedy, problems, notes)


def _compare_logits(output: Path, base: Path, adapters: list[Path], weights: list[float], dtype: str,
                    prompts: tuple[str, ...], notes: list[str]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .output import quiet_libraries

    quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(output)
        merged = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        rows = merged.get_input_embeddings().weight.shape[0]
        if model.get_input_embeddings().weight.shape[0] != rows:  # the adapter resized the vocabulary
            model.resize_token_embeddings(rows)
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        if len(adapters) > 1 or weights[0] != 1.0:
            for i, a in enumerate(adapters[1:], start=1):
                peft_model.load_adapter(a, adapter_name=f"a{i}")
            names = [f"a{i}" for i in range(len(adapters))]
            try:
                # "cat" stacks the factors, which is exactly sum_i w_i * dW_i ("linear" is not)
                peft_model.add_weighted_adapter(names, list(weights), "combined", combination_type="cat")
            except Exception as e:  # noqa: BLE001 - PEFT refuses some combinations; report, don't fail
                notes.append(f"PEFT cannot combine these adapters for a logit check ({e}); logits not compared")
                return None, None, None, None
            peft_model.set_adapter("combined")
        peft_model.eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            outputs.append((merged(input_ids=ids).logits, peft_model(input_ids=ids).logits))
    diff = max(float((a - b).abs().max()) for a, b in outputs)
    peak = max(float(b.abs().max()) for _, b in outputs)
    tol = RTOL[dtype] * max(peak, 1.0)
    greedy = True
    for a, b in outputs:
        # a greedy token may flip only where the reference's top two logits are closer than the rounding allows;
        # a flip at a clear margin is a real difference, and is reported as one
        top2 = b.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * tol
        greedy = greedy and bool(((a.argmax(-1) == b.argmax(-1)) | ~clear).all())
    return diff, peak, tol, greedy

