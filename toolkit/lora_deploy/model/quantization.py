"""What a checkpoint's ``quantization_config`` says: bitsandbytes 4-bit settings, compressed-tensors schemes.

One reading of these configs for the merge (QLoRA bases, quantized outputs), pre-flight (which quantized bases
vLLM can serve with LoRA) and the launcher (FP8 on a CPU build); torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_deploy._files import read_json_object
from lora_deploy.errors import InputError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the 4-bit block sizes bitsandbytes supports


@dataclass(frozen=True)
class Bnb4bit:
    """How a QLoRA base was quantized: bitsandbytes' ``BitsAndBytesConfig`` 4-bit fields.

    ``skip_modules`` is ``llm_int8_skip_modules``: None leaves transformers' defaults (the output head,
    tied weights) unquantized; a list replaces those defaults, exactly as transformers reads it.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise InputError(
                f"4-bit quant type {self.quant_type!r} is not bitsandbytes' nf4 or fp4",
                hint="use --qlora nf4 (QLoRA's default) or --qlora fp4",
            )
        if self.blocksize not in BLOCKSIZES:
            raise InputError(
                f"4-bit block size {self.blocksize} is not one bitsandbytes supports",
                hint=f"use one of {', '.join(map(str, BLOCKSIZES))} (64 is the default)",
            )

    @classmethod
    def from_quantization_config(cls, qc: dict) -> Bnb4bit:
        """Read a ``quantization_config`` (config.json of a bitsandbytes 4-bit checkpoint)."""
        if str(qc.get("quant_method", "")).lower() != "bitsandbytes" or not qc.get("load_in_4bit", True):
            raise InputError(
                f"quantization_config {qc.get('quant_method')!r} is not bitsandbytes 4-bit",
                hint="QLoRA merges read bitsandbytes 4-bit (NF4/FP4) configs",
            )
        return cls(
            quant_type=str(qc.get("bnb_4bit_quant_type", "fp4")),
            blocksize=int(qc.get("bnb_4bit_blocksize") or 64),
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            skip_modules=None if qc.get("llm_int8_skip_modules") is None else tuple(qc["llm_int8_skip_modules"]),
        )

    @classmethod
    def from_option(cls, value: str, *, double_quant: bool = False) -> Bnb4bit:
        """``--qlora nf4|fp4`` (with ``--qlora-double-quant``), or ``--qlora MODEL``: a bitsandbytes 4-bit model (a
        folder, its config.json, or a hub id already in the local cache) whose ``quantization_config`` the adapter
        was trained with. The block size is 64: transformers' BitsAndBytesConfig has no other."""
        from pathlib import Path

        from lora_deploy.hub import local_config

        if value.lower() in ("nf4", "fp4"):
            return cls(value.lower(), 64, double_quant)
        path = Path(value)
        config = path if path.is_file() else local_config(value)
        if config is None:
            raise InputError(
                f"--qlora {value!r} is neither nf4, fp4, a model folder with a config.json, nor a hub "
                "id in the local cache",
                hint="--qlora nf4 [--qlora-double-quant], or the quantized "
                "base's folder (hf download ID config.json first for a hub id)",
            )
        qc = read_json_object(config, missing="no config.json", hint="give the 4-bit settings: --qlora nf4 ...").get(
            "quantization_config"
        )
        if not isinstance(qc, dict):
            raise InputError(f"{config} has no quantization_config", hint="give the 4-bit settings: --qlora nf4 ...")
        return cls.from_quantization_config(qc)

    def describe(self) -> str:
        return f"{self.quant_type.upper()} blocks of {self.blocksize}" + (", double quant" if self.double_quant else "")

    def as_dict(self) -> dict:
        return {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "skip_modules": None if self.skip_modules is None else list(self.skip_modules),
        }


def checkpoint_quantization(folder: str | Path) -> dict | None:
    """The ``quantization_config`` of a checkpoint folder's config.json; None when it has none or is unreadable."""
    try:
        quant = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return quant if isinstance(quant, dict) else None


def _groups(quantization_config: dict) -> list[dict]:
    return [g for g in (quantization_config.get("config_groups") or {}).values() if isinstance(g, dict)]


def scheme_of(quantization_config: dict) -> str | None:
    """Which of our schemes a compressed-tensors ``quantization_config`` is (None for anything else)."""
    if str(quantization_config.get("quant_method", "")).lower() != "compressed-tensors":
        return None
    for group in _groups(quantization_config):
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        if weights.get("num_bits") == 8 and acts.get("num_bits") == 8 and acts.get("dynamic"):
            if weights.get("type") == "float" and acts.get("type") == "float":
                return "fp8-dynamic"
            if weights.get("type") == "int" and acts.get("type") == "int":
                return "w8a8-int8"
    return None


def is_float8(quantization_config: dict) -> bool:
    """Whether the weights are 8-bit floats: any FP8 method (``fp8``, ``fbgemm_fp8``...) or a compressed-tensors
    group of float weights (our ``fp8-dynamic`` among them)."""
    return "fp8" in str(quantization_config.get("quant_method", "")).lower() or any(
        (g.get("weights") or {}).get("type") == "float" for g in _groups(quantization_config)
    )
