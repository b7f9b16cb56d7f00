"""Quantized merged checkpoints in the compressed-tensors format (what llm-compressor writes, what vLLM loads).

Only data-free schemes: per-output-channel weight scales computed from the merged weight itself, and
activations quantized per token at run time (dynamic). So a checkpoint is written tensor by tensor, as
the 16-bit merge is, with no calibration data and no whole model in memory:

- ``fp8-dynamic``: FP8 E4M3 weights, per-channel scales; FP8 per-token activations (``FP8_DYNAMIC``);
- ``w8a8-int8``: symmetric INT8 weights, per-channel scales; INT8 per-token activations (``W8A8``).

Every ``nn.Linear`` of the architecture is quantized except the output head; embeddings and norms stay in
the 16-bit output dtype. The scales, the rounding and the ``quantization_config`` come from the
``compressed-tensors`` package itself (a vLLM dependency), not from code of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_deploy.errors import InputError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from lora_deploy.model.layout import CheckpointNames

# our option name -> (compressed-tensors preset, storage format, safetensors dtype of the weight)
SCHEMES = {"fp8-dynamic": ("FP8_DYNAMIC", "float-quantized", "F8_E4M3"), "w8a8-int8": ("W8A8", "int-quantized", "I8")}
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class OutputQuantization:
    """Which checkpoint weights a quantized merge writes in 8 bits, and the config that says so."""

    scheme: str  # a key of SCHEMES
    weights: frozenset[str]  # checkpoint names of the quantized ``.weight`` tensors
    ignore: tuple[str, ...]  # Linear modules left in 16 bits (the output head)

    @property
    def weight_dtype(self) -> str:
        return SCHEMES[self.scheme][2]

    def config(self) -> dict:
        """The ``quantization_config`` that vLLM and transformers read (compressed-tensors' own serialisation)."""
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        preset, fmt, _ = SCHEMES[self.scheme]
        return QuantizationConfig(
            config_groups={"group_0": _scheme(preset)},
            ignore=list(self.ignore),
            format=fmt,
            quantization_status=QuantizationStatus.COMPRESSED,
        ).to_dict()


def _scheme(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(preset, ["Linear"])


def plan_quantization(scheme: str, names: CheckpointNames, dtype: str) -> OutputQuantization:
    """Choose the weights to quantize (every Linear but the output head), from a meta-device model."""
    if scheme not in SCHEMES:
        raise InputError(
            f"--quantize {scheme!r} is not one of {', '.join(SCHEMES)}",
            hint="fp8-dynamic for Hopper/Ada GPUs (and vLLM's CPU build), w8a8-int8 for older GPUs",
        )
    if dtype == "float32":
        raise InputError(
            "--quantize writes 8-bit weights with 16-bit scales and activations",
            hint="use --dtype bfloat16 (or float16) with --quantize",
        )
    require_compressed_tensors()
    model = names.meta_model()
    if model is None:
        raise UnsupportedError(
            "transformers cannot build this architecture, so its Linear layers are unknown",
            hint="write a 16-bit merge and quantize it with llm-compressor",
        )
    from torch import nn

    config = model.config.to_dict()
    if any(p.dim() == 3 for p in model.parameters()) or any(
        config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
    ):
        # fused experts are not Linear layers, and vLLM builds routers unquantized: either way the checkpoint
        # would not match what vLLM's MoE layers expect
        raise UnsupportedError(
            "--quantize does not handle MoE models (experts and routers) yet",
            hint="write a 16-bit merge (and quantize it with llm-compressor if needed)",
        )
    head = model.get_output_embeddings()
    weights, ignore = set(), []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if module is head:
            ignore.append(name)
            continue
        ck = names.single(f"{name}.weight")
        if ck is None:
            raise UnsupportedError(
                f"cannot find {name}.weight in the checkpoint to quantize it",
                hint="write a 16-bit merge and quantize it with llm-compressor",
            )
        weights.add(ck)
    if not weights:
        raise UnsupportedError(
            "this architecture has no nn.Linear layers to quantize (Conv1D models such as GPT-2)",
            hint="write a 16-bit merge",
        )
    return OutputQuantization(scheme, frozenset(weights), tuple(sorted(ignore)))


def require_compressed_tensors() -> None:
    """Fail before planning when the compressed-tensors package (a vLLM dependency) is missing."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise UnsupportedError(
            "--quantize writes the compressed-tensors format and needs the compressed-tensors "
            "package, which is not installed",
            hint="pip install 'lora-deploy[quantize]' (vLLM installs it too)",
        )


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit weight, per-channel scale [out, 1] in ``w``'s dtype) for a 16-bit weight, via compressed-tensors."""
    import torch
    from compressed_tensors.compressors import NaiveQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    s = _scheme(SCHEMES[scheme][0])
    lo, hi = torch.aminmax(w, dim=1, keepdim=True)
    scale, zero = calculate_qparams(lo, hi, s.weights)
    out = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero}, s)
    return out["weight"], out["weight_scale"]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an 8-bit weight and its scale stand for."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    return dequantize(q, scale.float(), dtype=None).float()


def fake_quantize_activations(model, scheme: str, modules: set[str]) -> list:
    """Forward pre-hooks that quantize the inputs of ``modules`` per token, as vLLM's dynamic scheme does.

    Returns the hook handles (call ``.remove()`` to undo).
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = _scheme(SCHEMES[scheme][0]).input_activations

    def hook(module, inputs):
        x = inputs[0]
        scale, zero = compute_dynamic_scales_and_zp(x, args, module)
        return (fake_quantize(x, scale, zero, args),) + tuple(inputs[1:])

    return [model.get_submodule(m).register_forward_pre_hook(hook) for m in modules]
