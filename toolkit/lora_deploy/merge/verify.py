"""Check a merged checkpoint against the base and the unmerged PEFT model (``merged --verify``).

This loads whole models (the base with PEFT, and the merged output) in float32, so it is opt-in.
It proves four things: no LoRA tensors remain, the tensor names and shapes are the base's, every
targeted weight changed, and the merged model's logits equal the unmerged PEFT model's.

For a QLoRA merge the unmerged model is the QLoRA model itself: the base loaded in 4-bit by
bitsandbytes (its codes and statistics, computed in float32), with the adapter on top. Merged into the
dequantized weights, the output must compute its logits; either way the report gives both choices' distance
to it, so the user sees which base the adapter wants. A verification that could not compare logits never passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_deploy.errors import UnsupportedError
from lora_deploy.model.shards import ShardIndex, load_tensor
from lora_deploy.prompts import CHECK_PROMPTS  # the same prompts as the quantization quality

if TYPE_CHECKING:
    import torch

    from lora_deploy.merge import MergePlan
    from lora_deploy.merge.nf4 import Bnb4bit

# logits tolerance relative to the largest logit, by output dtype (one rounding of each weight)
RTOL = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}


@dataclass(frozen=True)
class QloraChoice:
    """How far one choice of base (``--merge-into``) lands from the QLoRA model, on the verify prompts."""

    merge_into: str
    max_logit_diff: float
    mean_kl: float  # KL(QLoRA model || this choice), nats per token, averaged over every position


@dataclass(frozen=True, kw_only=True)
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
    oracle: str = "unmerged PEFT model"
    qlora_choices: list[QloraChoice] = field(default_factory=list)
    compared: bool = True  # the logits were compared with the oracle; a verify that could not compare never passes

    @property
    def verdict(self) -> str:
        if not self.compared:
            return "NOT VERIFIED"
        return "PASSED" if self.passed else "FAILED"


def require_qlora_oracle() -> None:
    """Fail before merging when ``--verify`` of a QLoRA merge cannot load the QLoRA model."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedError(
            "--verify of a QLoRA merge loads the QLoRA model (the base in 4-bit with the adapter) "
            "and needs bitsandbytes, which is not installed",
            hint="pip install 'lora-deploy[qlora]' (bitsandbytes runs on CPU), or drop --verify",
        )


def verify_merge(plan: MergePlan, *, prompts: tuple[str, ...] = CHECK_PROMPTS) -> VerifyReport:
    """Verify the checkpoint ``plan`` wrote into ``plan.output`` (what ``merged --verify`` runs): no LoRA left, the
    base's tensors, every targeted tensor changed, and the logits of the unmerged model (or, for a QLoRA adapter
    merged into the dequantized base, of the QLoRA model) on ``prompts``.

    The base is taken as the merge saw it: a 4-bit checkpoint's packed weights as the values they stand for, and a
    16-bit base rounded through 4-bit where the adapter was trained on a 4-bit one."""
    from lora_deploy.merge.nf4 import Stored4bit, dequantize_stored, roundtrip_4bit
    from lora_deploy.model.shards import TensorReader

    plans = {p.name: p for p in plan.tensors}
    reader = TensorReader()

    def start_value(name: str) -> torch.Tensor:  # the value the adapter's delta was added to
        p = plans[name]
        if isinstance(p.fourbit, Stored4bit):
            return dequantize_stored(p.fourbit, reader)
        t = load_tensor(p.base_entry)
        return roundtrip_4bit(t, p.fourbit) if p.fourbit is not None else t

    try:
        return _verify(plan, start_value, prompts)
    finally:
        reader.close()


def _verify(plan: MergePlan, start_value: Callable[[str], torch.Tensor], prompts: tuple[str, ...]) -> VerifyReport:
    from lora_deploy.merge.nf4 import Stored4bit

    output, base, base_index = plan.output, plan.base.path, plan.base_index
    adapters, weights = [a.path for a in plan.adapters], list(plan.weights)
    expected_changes, allowed_new, qlora = plan.changed_tensors, plan.new_or_reshaped, plan.qlora
    prequantized = any(isinstance(p.fourbit, Stored4bit) for p in plan.tensors)
    problems: list[str] = []
    notes: list[str] = []
    out_index = ShardIndex.from_folder(output)
    lora_names = [n for n in out_index.tensors if "lora" in n or "base_layer" in n or "modules_to_save" in n]
    if (output / "adapter_config.json").exists():
        lora_names.append("adapter_config.json")
    if lora_names:
        problems.append(f"LoRA leftovers in the output: {', '.join(lora_names[:5])}")
    base_shapes = {n: e.shape for n, e in base_index.tensors.items()}
    out_shapes = {n: e.shape for n, e in out_index.tensors.items()}
    missing = sorted(set(base_shapes) - set(out_shapes))
    extra = sorted(set(out_shapes) - set(base_shapes) - set(allowed_new))
    reshaped = sorted(
        n for n in set(base_shapes) & set(out_shapes) if base_shapes[n] != out_shapes[n] and n not in allowed_new
    )
    for label, names in (("missing", missing), ("unexpected", extra), ("reshaped", reshaped)):
        if names:
            problems.append(f"{label} tensors: {', '.join(names[:5])}")
    unchanged = []
    for name in expected_changes:
        if name in out_index.tensors and name in base_index.tensors:
            a = load_tensor(out_index.tensors[name]).float()
            b = start_value(name).float()
            if a.shape == b.shape and bool((a == b).all()):
                unchanged.append(name)
    if unchanged:
        problems.append(f"{len(unchanged)} targeted tensor(s) did not change: {', '.join(unchanged[:5])}")
    quantized_oracle = qlora is not None and plan.merge_into == "dequantized"
    oracle = "QLoRA model (4-bit base + adapter)" if quantized_oracle else "unmerged PEFT model"
    models = _Models(output, base=base, adapters=adapters, weights=weights, prompts=prompts, notes=notes)
    merged_logits = models.merged()
    reference = models.unmerged(qlora if quantized_oracle else None, prequantized)
    diff = peak = tol = greedy = None
    if reference is None:
        problems.append(f"the logits were not compared with the {oracle} (see the notes), so the merge is not verified")
    else:
        diff, peak, tol, greedy = _compare(merged_logits, reference, plan.dtype)
        if diff > tol:
            problems.append(f"logits differ from the {oracle} by {diff:.3g} (tolerance {tol:.3g})")
        if greedy is False:
            problems.append(
                f"the greedy next token differs from the {oracle}'s where its top two logits are clearly apart"
            )
    choices = models.qlora_choices(qlora, prequantized, reference if quantized_oracle else None) if qlora else []
    return VerifyReport(
        passed=not problems,
        lora_free=not lora_names,
        same_tensors=not (missing or extra or reshaped),
        changed_modules=len(expected_changes) - len(unchanged),
        unchanged_modules=unchanged,
        max_logit_diff=diff,
        max_logit=peak,
        tolerance=tol,
        greedy_match=greedy,
        problems=problems,
        notes=notes,
        oracle=oracle,
        qlora_choices=choices,
        compared=reference is not None,
    )


class _Models:
    """The models a verification compares, loaded in float32 on demand, and their logits on the prompts."""

    def __init__(
        self,
        output: Path,
        *,
        base: Path,
        adapters: list[Path],
        weights: list[float],
        prompts: tuple[str, ...],
        notes: list[str],
    ):
        from lora_deploy.merge.quality import fixed_token_ids
        from lora_deploy.model.adapter import has_tokenizer

        self.output, self.base, self.adapters, self.weights, self.notes = output, base, adapters, weights, notes
        if has_tokenizer(output):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(output)
            self.ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
        else:  # no tokenizer anywhere (a bare base): the logits are compared on fixed token ids instead of text
            self.ids = fixed_token_ids(_vocab_size(output), len(prompts))
            notes.append(
                f"{output} has no tokenizer: logits compared on {len(self.ids)} fixed sequences of token ids "
                "instead of the text prompts"
            )
        self.rows: int | None = None

    def logits(self, model) -> list[torch.Tensor]:
        import torch

        with torch.no_grad():
            return [model(input_ids=ids).logits.float() for ids in self.ids]

    def merged(self) -> list[torch.Tensor]:
        import torch
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(self.output, dtype=torch.float32).eval()
        self.rows = model.get_input_embeddings().weight.shape[0]
        return self.logits(model)

    def _base(self, quantized: Bnb4bit | None = None, prequantized: bool = False):
        """The base in float32: as stored, or loaded in 4-bit by bitsandbytes (``quantized``, or a 4-bit checkpoint)."""
        import torch
        from transformers import AutoModelForCausalLM

        kwargs: dict = {}
        if quantized is not None and not prequantized:
            from transformers import BitsAndBytesConfig

            kwargs = {
                "quantization_config": BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type=quantized.quant_type,
                    bnb_4bit_compute_dtype=torch.float32,
                    bnb_4bit_use_double_quant=quantized.double_quant,
                    llm_int8_skip_modules=None if quantized.skip_modules is None else list(quantized.skip_modules),
                ),
                "device_map": "cpu",
            }
        elif prequantized:
            kwargs = {"device_map": "cpu"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32, **kwargs)
        if quantized is not None and quantized.double_quant and not prequantized:
            self._reference_nested_statistics(model, quantized)
        if quantized is not None or prequantized:
            self._float32_layers(model)
        if self.rows and model.get_input_embeddings().weight.shape[0] != self.rows:  # type: ignore[index]  # the adapter resized it
            model.resize_token_embeddings(self.rows)
        return model

    def _float32_layers(self, model) -> None:
        """Replace every bitsandbytes 4-bit layer by a float32 Linear holding the weight its codes stand for.

        The QLoRA model's weights are bitsandbytes' 4-bit codes and statistics; its forward pass is not the oracle:
        on CPUs with AMX/AVX512-FP16, bitsandbytes computes the 4-bit matmul in lower precision even with a float32
        compute dtype (1.8e-3 of the peak logit away from the same weights in float32, measured with 0.50.2). So
        the oracle computes those weights in float32, as the merge does; where bitsandbytes' own dequantization
        disagrees with code x absmax, code x absmax is used and a note says so.
        """
        import torch

        from lora_deploy.merge.nf4 import dequantize_bnb_layer

        wrong = total = 0
        for name, module in list(model.named_modules()):
            if getattr(getattr(module, "weight", None), "quant_state", None) is None:
                continue
            weight, agrees = dequantize_bnb_layer(module.weight)
            total += 1
            wrong += not agrees
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
        if wrong:
            self.notes.append(
                f"bitsandbytes' dequantize_4bit on this CPU disagrees with code x absmax on {wrong} of "
                f"{total} 4-bit layers; the QLoRA model here uses code x absmax of bitsandbytes' own "
                "codes and statistics"
            )

    def _reference_nested_statistics(self, model, s: Bnb4bit) -> None:
        """Give a model bitsandbytes just quantized on this CPU the double-quantization statistics of its
        reference kernel: the nearest 8-bit code, as the merge writes them (and as bitsandbytes' CUDA kernel,
        by its source, picks them, so what a QLoRA run on a GPU trained against).

        bitsandbytes' CPU C kernel rounds a few 8-bit absmax codes to the farther of the two neighbouring code
        values (measured with bitsandbytes 0.50.2: 7 of 4608 on a tiny Llama, 159 of 100,000 random values);
        the 4-bit codes, the dequantization and the forward pass stay bitsandbytes' own.
        """
        import torch

        from lora_deploy.merge.nf4 import quantize_4bit

        original = dict(self._base().named_parameters())
        differ = total = 0
        for name, module in model.named_modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is None or not getattr(state, "nested", False):
                continue
            q = quantize_4bit(original[f"{name}.weight"].data, s)
            differ += int((state.absmax != q.absmax).sum())
            total += q.absmax.numel()
            state.absmax = q.absmax.to(state.absmax.device)
            state.state2.absmax = q.absmax2
            state.offset = torch.tensor(q.offset)
        if differ:
            self.notes.append(
                f"bitsandbytes' CPU kernel rounded {differ} of {total} double-quantization statistics "
                "to the farther 8-bit code; the QLoRA model here uses its reference kernel's nearest "
                "code, as the merge does"
            )

    def _with_adapters(self, model):
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, self.adapters[0], adapter_name="a0")
            if len(self.adapters) > 1 or self.weights[0] != 1.0:
                for i, a in enumerate(self.adapters[1:], start=1):
                    peft_model.load_adapter(a, adapter_name=f"a{i}")
                names = [f"a{i}" for i in range(len(self.adapters))]
                try:
                    # "cat" stacks the factors, which is exactly sum_i w_i * dW_i ("linear" is not)
                    peft_model.add_weighted_adapter(names, list(self.weights), "combined", combination_type="cat")
                except Exception as e:  # noqa: BLE001 - PEFT refuses some combinations; report, don't fail
                    self.notes.append(
                        f"PEFT cannot combine these adapters for a logit check ({e}); logits not compared"
                    )
                    return None
                peft_model.set_adapter("combined")
        return peft_model.eval()

    def unmerged(self, quantized: Bnb4bit | None = None, prequantized: bool = False) -> list[torch.Tensor] | None:
        """Logits of the unmerged model: base (4-bit for a QLoRA oracle) with the adapter(s) on top."""
        model = self._with_adapters(self._base(quantized, prequantized))
        return None if model is None else self.logits(model)

    def qlora_choices(
        self, qlora: Bnb4bit, prequantized: bool, reference: list[torch.Tensor] | None = None
    ) -> list[QloraChoice]:
        """Each choice of base, unmerged (what its merge computes), against the QLoRA model (``reference``)."""
        from lora_deploy.merge.nf4 import quantized_linear_modules, roundtrip_4bit

        reference = reference if reference is not None else self.unmerged(qlora, prequantized)
        if reference is None:
            return []
        if prequantized:
            self.notes.append("the base is a 4-bit checkpoint; the original 16-bit weights are not there to compare")
            return []
        choices = []
        for choice in ("dequantized", "original"):
            model = self._base()
            if choice == "dequantized":
                for name in quantized_linear_modules(model, qlora):
                    layer = model.get_submodule(name)
                    layer.weight.data = roundtrip_4bit(layer.weight.data, qlora)
            peft_model = self._with_adapters(model)
            if peft_model is None:
                return []
            diff, kl = _distance(self.logits(peft_model), reference)
            choices.append(QloraChoice(choice, diff, kl))
        return choices


def _vocab_size(folder: Path) -> int:
    import json

    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or {}
    return int(config.get("vocab_size") or text["vocab_size"])


def _distance(a: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(max |logit difference|, mean KL(ref || a) per position in nats)."""
    from lora_deploy.merge.quality import kl_per_position

    diff = max(float((x - y).abs().max()) for x, y in zip(a, ref, strict=True))
    return diff, float(kl_per_position(a, ref).mean())


def _compare(merged: list[torch.Tensor], reference: list[torch.Tensor], dtype: str):
    """(max |dlogit|, peak logit, tolerance, greedy agreement where the reference's top two are clearly apart)."""
    outputs = list(zip(merged, reference, strict=True))
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
