"""How much a quantized merge changes the model: logit KL divergence against the 16-bit merge.

Measured on a few prompts, in float32, with two models of the written architecture:

- the quantized one: every 8-bit weight dequantized from the written checkpoint (weight and scale), and
  every quantized layer's input quantized per token at run time, as vLLM's dynamic schemes do;
- the 16-bit one: the same checkpoint with those weights as the 16-bit merge holds them (recomputed by
  the merge engine, so no 16-bit copy is ever written).

Everything else (embeddings, norms, the head) is read from the written checkpoint and is the same in both.
This holds the whole model in float32 (4 bytes per parameter, one tensor more at a time), which is why it runs
after the checkpoint is committed, reports a failure as a warning, and ``--no-quality`` skips it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_deploy.output import quiet_libraries
from lora_deploy.prompts import CHECK_PROMPTS

if TYPE_CHECKING:
    from lora_deploy.merge.plan import MergePlan

# the prompts quality and verify measure on: the smoke test's own prompt and two generic ones


@dataclass(frozen=True, kw_only=True)
class QuantQuality:
    """The quantized model against the 16-bit merge, over every position of the prompts."""

    mean_kl: float  # KL(16-bit || quantized), nats per token
    max_kl: float
    top1_agreement: float  # share of positions whose most likely next token is the same
    positions: int
    measured_on: str  # what the logits were computed on: the prompts, or fixed token ids (no tokenizer)


@dataclass(frozen=True, kw_only=True)
class QuantizationReport:
    """What a quantized merge wrote: the scheme, how many weights, the size against a 16-bit merge, the quality."""

    scheme: str
    weights_quantized: int
    bytes_written: int
    bytes_16bit: int  # what the same merge writes without --quantize
    quality: QuantQuality | None  # None with --no-quality


@quiet_libraries()
def measure_quality(
    plan: MergePlan, folder: Path, adapter_tensors: list[dict], prompts: tuple[str, ...] = CHECK_PROMPTS
) -> QuantQuality:
    """Compare the quantized checkpoint in ``folder`` (written from ``plan``) with the 16-bit merge.

    Memory: one float32 model and one tensor at a time (each tensor is copied into the model as it is read).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from lora_deploy.errors import UnsupportedError
    from lora_deploy.merge.quantize import SCALE_SUFFIX, dequantize_weight, fake_quantize_activations
    from lora_deploy.merge.values import compute_value
    from lora_deploy.model.shards import TensorReader

    if plan.quantization is None:
        raise ValueError("measure_quality compares a quantized merge: the plan has no quantization")
    scheme = plan.quantization
    config = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    quantized = {p.name: p for p in plan.tensors if p.quantize}
    files = sorted(folder.glob("*.safetensors"))
    handles = [safe_open(f, "pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    missing = [k for k in where if not k.endswith(SCALE_SUFFIX) and k not in params]
    if missing:
        raise UnsupportedError(
            f"cannot measure the quantized model's quality: the checkpoint's tensor names are not "
            f"the model's ({', '.join(missing[:3])})",
            hint="add --no-quality",
        )

    def put(name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            params[name].copy_(value.float())

    for key, handle in where.items():
        if not key.endswith(SCALE_SUFFIX) and key not in quantized:
            put(key, handle.get_tensor(key))
    tok = _tokenizer(folder)
    if tok is not None:
        ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
        measured_on = f"{len(prompts)} generic text prompts"
    else:
        ids = fixed_token_ids(model.get_input_embeddings().weight.shape[0], len(prompts))
        measured_on = f"{len(ids)} fixed sequences of token ids (the checkpoint has no usable tokenizer)"

    def logits() -> list:
        with torch.no_grad():
            return [model(input_ids=i).logits.float() for i in ids]

    reader = TensorReader()
    out_dtype = getattr(torch, plan.dtype)
    try:
        for name, p in quantized.items():  # the 16-bit merge: recomputed by the merge engine, one tensor at a time
            put(name, compute_value(p, reader, adapter_tensors).to(out_dtype))
    finally:
        reader.close()
    reference = logits()
    for name in quantized:
        put(
            name,
            dequantize_weight(where[name].get_tensor(name), where[name + SCALE_SUFFIX].get_tensor(name + SCALE_SUFFIX)),
        )
    hooks = fake_quantize_activations(model, scheme.scheme, {n[: -len(".weight")] for n in scheme.weights})
    try:
        test = logits()
    finally:
        for h in hooks:
            h.remove()
    kl = kl_per_position(test, reference)
    top1 = torch.cat([(t.argmax(-1) == r.argmax(-1)).reshape(-1) for t, r in zip(test, reference, strict=True)])
    return QuantQuality(
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1_agreement=float(top1.float().mean()),
        positions=int(kl.numel()),
        measured_on=measured_on,
    )


def kl_per_position(test: list, reference: list):
    """KL(reference || test) in nats at every position of every prompt, one flat tensor (logits in, any shape)."""
    import torch

    return torch.cat(
        [
            torch.nn.functional.kl_div(t.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none")
            .sum(-1)
            .reshape(-1)
            for t, r in zip(test, reference, strict=True)
        ]
    )


def fixed_token_ids(vocab_size: int, count: int = 3, length: int = 12) -> list:
    """``count`` reproducible sequences of token ids spread over the vocabulary, for models without a tokenizer."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, length), generator=g) for _ in range(count)]


def _tokenizer(folder: Path):
    from lora_deploy.model.adapter import has_tokenizer

    if not has_tokenizer(folder):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fixed token ids instead, and the report says so
        return None
