"""The private APIs lora-deploy uses, imported by name: a dependency release that moves one fails here, with the
name, instead of somewhere inside a merge or a pre-flight (pyproject.toml bounds these packages for that reason)."""

from __future__ import annotations

import importlib

import pytest

PRIVATE_APIS = [
    ("transformers.core_model_loading", "revert_weight_conversion"),  # layout.py: checkpoint names
    ("transformers.quantizers.quantizers_utils", "should_convert_module"),  # merge/nf4.py: which layers bnb quantizes
    ("transformers.quantizers.base", "HfQuantizer"),
    ("transformers.models.auto.configuration_auto", "CONFIG_MAPPING"),
    ("compressed_tensors.quantization.lifecycle.forward", "dequantize"),  # merge/quantize.py and quality.py
    ("compressed_tensors.quantization.lifecycle.forward", "fake_quantize"),
    ("compressed_tensors.quantization.utils", "calculate_qparams"),
    ("compressed_tensors.quantization.utils", "compute_dynamic_scales_and_zp"),
    ("compressed_tensors.compressors", "NaiveQuantizationCompressor"),
]
VLLM_APIS = [  # preflight.py asks the installed vLLM its own rules
    ("vllm.lora.peft_helper", "PEFTHelper"),
    ("vllm.config.lora", "LoRAConfig"),
    ("vllm.model_executor.layers.quantization", "QUANTIZATION_METHODS"),
]


@pytest.mark.parametrize("module,name", PRIVATE_APIS, ids=lambda v: v if isinstance(v, str) else None)
def test_private_api_is_where_we_import_it(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} moved"


@pytest.mark.parametrize("module,name", VLLM_APIS, ids=lambda v: v if isinstance(v, str) else None)
def test_vllm_validation_we_call_is_where_we_import_it(module, name):
    pytest.importorskip("vllm")
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} moved"


def test_the_cpu_builds_int8_kernel_rule_is_where_we_import_it():
    """Only vLLM's CPU build has the AMX INT8 kernel rule that pre-flight asks per weight."""
    from helpers import require_cpu_build

    require_cpu_build()
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    assert callable(check_cpu_sgl_kernel)
