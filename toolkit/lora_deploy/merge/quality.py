"""How much a quantized merge changes the model: logit KL divergence against the 16-bit merge.

Measured on a few prompts, in float32, with two models of the written architecture:

- the quantized one: every 8-bit weight dequantized from the written checkpoint (weight and scale), and
  every quantized layer's input quantized per token at run time, as vLLM's dynamic schemes do;
- the 16-bit one: the same checkpoint with those weights as the 16-bit merge holds them (recomputed by
  the merge engine, so no 16-bit copy is ever written).

Everything else (embeddings, norms, the head) is read from the written checkpoint and is the same in both.
This loads the whole model once, which is why ``--no-quality`` skips it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import MergePlan

DEFAULT_PROMPTS = ("Customer: I lost my password.\nAgent:", "The quick brown fox", "Hello, how are you today?")


@dataclass(frozen=True)
class QuantQuality:
    """The quantized model against the 16-bit merge, over every position of the prompts."""

    mean_kl: float  # KL(16-bit || quantized), nats per token
    max_kl: float
    top1_agreement: float  # share of positions whose most likely next token is the same
    positions: int


@dataclass(frozen=True)
class QuantizationReport:
    """What a quantized merge wrote: the scheme, how many weights, the size against a 16-bit merge, the quality."""

    scheme: str
    weights_quantized: int
    bytes_written: int
    bytes_16bit: int  # what the same merge writes without --quantize
    quality: QuantQuality | None  # None with --no-quality


def measure_quality(plan: MergePlan, folder: Path, adapter_tensors: list[dict],
                    prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> QuantQuality:
    """Compare the quantized checkpoint in ``folder`` (written from ``plan``) with the 16-bit merge."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..errors import UnsupportedError
    from ..output import quiet_libraries
    from ..shards import TensorReader
    from .execute import compute_value
    from .quantize import dequantize_weight, fake_quantize_activations

    quiet_libraries()
    config = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    quantized, merged16 = {}, {}
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                state[key] = st.get_tensor(key)
    reader = TensorReader()
    out_dtype = getattr(torch, plan.dtype)
    try:
        for p in plan.tensors:
            if p.quantize:
                quantized[p.name] = dequantize_weight(state.pop(p.name), state.pop(p.name + "_scale"))
                merged16[p.name] = compute_value(p, reader, adapter_tensors).to(out_dtype).float()
    finally:
        reader.close()
    loaded = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = set(loaded.missing_keys) - tied - set(quantized)
    if loaded.unexpected_keys or missing:
        raise UnsupportedError(f"cannot measure the quantized model's quality: the checkpoint's tensor names are not "
                               f"the model's ({', '.join(sorted(missing | set(loaded.unexpected_keys))[:3])})",
                               hint="add --no-quality")
    modules = {n[: -len(".weight")] for n in plan.quantization.weights}
    tok = _tokenizer(folder)
    ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts] if tok else \
        [torch.tensor([[1, 5, 17, 99, 250, 3, 42, 7]])]

    def logits(weights: dict) -> list:
        model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            return [model(input_ids=i).logits.float() for i in ids]

    reference = logits(merged16)
    hooks = fake_quantize_activations(model, plan.quantization.scheme, modules)
    try:
        test = logits(quantized)
    finally:
        for h in hooks:
            h.remove()
    kl = torch.cat([torch.nn.functional.kl_div(t.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                               reduction="none").sum(-1).reshape(-1) for t, r in zip(test, reference)])
    top1 = torch.cat([(t.argmax(-1) == r.argmax(-1)).reshape(-1) for t, r in zip(test, reference)])
    return QuantQuality(float(kl.mean()), float(kl.max()), float(top1.float().mean()), int(kl.numel()))


def _tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fixed token ids instead
        return None
