"""bitsandbytes 4-bit (NF4/FP4) quantization, reproduced exactly in plain PyTorch.

A QLoRA adapter was trained against the *dequantized* 4-bit base: every quantized ``nn.Linear``
computed with ``code[q] * absmax`` instead of its original 16-bit weight. To merge the adapter into
the function it was trained on (``--merge-into dequantized``) we need those exact values, without
requiring bitsandbytes at merge time. This module re-implements what bitsandbytes 0.4x-0.50 does on
every backend that shares its reference kernels (``bitsandbytes/backends/default/ops.py``):

- 4-bit: blocks of ``blocksize`` values, ``absmax`` per block, ``scaled = clamp(x * (1/absmax), -1, 1)``,
  code index by bucketing against the midpoints of the sorted 16-value code (FP4's code is not sorted;
  its indices are mapped back), dequantized as ``code[q] * absmax`` in float32;
- double quantization (``bnb_4bit_use_double_quant``): the float32 absmax vector minus its mean is
  itself quantized blockwise (blocks of 256) to the 8-bit dynamic code, and restored as
  ``dyn[q8] * absmax2 + mean``.

bitsandbytes itself is the oracle in the tests (``tests/test_qlora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from lora_deploy.errors import InputError
from lora_deploy.model.quantization import BLOCKSIZES, Bnb4bit  # noqa: F401  (re-exported: the 4-bit settings)
from lora_deploy.model.shards import ShardIndex, TensorEntry, TensorReader, st_dtype

if TYPE_CHECKING:
    import torch

_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 2) in bit-pattern order, normalised by 12 below
_FP4 = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCKSIZE = 256


@cache
def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16 code values, in index order (bitsandbytes' ``get_4bit_type``)."""
    import torch

    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data / data.abs().max()


@cache
def _bounds_4bit(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    code = code_4bit(quant_type)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), used for double quantization."""
    import torch

    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values scaled into [-1, 1] per block, float32 absmax per block), as bitsandbytes computes them."""
    import torch

    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    com = flat[:full].reshape(full // blocksize, blocksize)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return scaled, absmax


def _expand(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values * absmax of their block, float32 (the dequantization product)."""
    import torch

    n = values.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(full)
    if rem:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


@dataclass(frozen=True, kw_only=True)
class Quantized4bit:
    """One tensor in 4-bit: code indices (one uint8 per value, unpacked), the absmax statistics, its shape."""

    indices: torch.Tensor  # uint8, one per value
    absmax: torch.Tensor  # float32 per block, or uint8 per block when double-quantized
    shape: tuple[int, ...]
    absmax2: torch.Tensor | None = None  # double quant: float32 per 256 absmax values
    offset: float = 0.0  # double quant: the mean subtracted before quantizing absmax


def quantize_4bit(t: torch.Tensor, s: Bnb4bit) -> Quantized4bit:
    """Quantize ``t`` exactly as ``bitsandbytes.functional.quantize_4bit`` does."""
    import torch

    bounds, order = _bounds_4bit(s.quant_type)
    scaled, absmax = _blockwise_scale(t.reshape(-1).float(), s.blocksize)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if s.quant_type != "nf4":
        q = order[q]
    q = q.to(torch.uint8)
    if not s.double_quant:
        return Quantized4bit(indices=q, absmax=absmax, shape=tuple(t.shape))
    offset = absmax.mean()
    dyn = dynamic_code()
    scaled2, absmax2 = _blockwise_scale(absmax - offset, NESTED_BLOCKSIZE)
    q8 = torch.bucketize(scaled2, (dyn[:-1] + dyn[1:]) / 2, out_int32=True).to(torch.uint8)
    return Quantized4bit(indices=q, absmax=q8, shape=tuple(t.shape), absmax2=absmax2, offset=float(offset))


def dequantize_4bit(q: Quantized4bit, quant_type: str, blocksize: int) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit layer computes with (``dequantize_4bit``, before any cast)."""
    absmax = q.absmax
    if q.absmax2 is not None:
        absmax = _expand(dynamic_code()[q.absmax.long()], q.absmax2, NESTED_BLOCKSIZE) + q.offset
    values = code_4bit(quant_type)[q.indices.long()]
    return _expand(values, absmax.float(), blocksize).reshape(q.shape)


def roundtrip_4bit(t: torch.Tensor, s: Bnb4bit) -> torch.Tensor:
    """``t`` quantized to 4 bits and back: the float32 weight the QLoRA model saw in place of ``t``."""
    return dequantize_4bit(quantize_4bit(t, s), s.quant_type, s.blocksize)


def quantized_linear_modules(model, s: Bnb4bit) -> list[str]:
    """The modules transformers' bitsandbytes quantizer turns into 4-bit layers, in ``model`` (a meta model).

    Uses transformers' own rules (``replace_with_bnb_linear``): ``nn.Linear`` (exact type) and ``Conv1D``
    modules, minus ``HfQuantizer.get_modules_to_not_convert`` (by default the output head, tied weights and
    the last module; else ``llm_int8_skip_modules``; plus the model's fp32-kept modules), matched with
    ``should_convert_module``.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(
        model,
        None if s.skip_modules is None else list(s.skip_modules),
        list(getattr(model, "_keep_in_fp32_modules", None) or []),
    )
    return [
        name
        for name, m in model.named_modules()
        if (type(m) is nn.Linear or isinstance(m, Conv1D)) and should_convert_module(name, skip)
    ]


@dataclass(frozen=True, kw_only=True)
class Stored4bit:
    """A weight that a bitsandbytes 4-bit checkpoint stores packed, and the tensors of its statistics.

    transformers saves each quantized weight ``W`` as ``W`` (two 4-bit codes per byte), ``W.absmax``,
    ``W.quant_map`` (the 16 code values), with double quantization ``W.nested_absmax`` and
    ``W.nested_quant_map``, and ``W.quant_state.bitsandbytes__nf4`` (JSON: shape, dtype, block sizes, offset).
    """

    packed: TensorEntry
    absmax: TensorEntry
    quant_map: TensorEntry
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: str  # the safetensors dtype the weight had before quantization
    nested_absmax: TensorEntry | None = None
    nested_quant_map: TensorEntry | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: float = 0.0


_STAT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def split_stored_4bit(index: ShardIndex) -> tuple[ShardIndex, dict[str, Stored4bit]]:
    """A bitsandbytes 4-bit checkpoint as the model it stands for: each packed weight listed with its real
    shape and dtype, the statistics' tensors hidden, and how to dequantize each packed weight."""
    import json

    import torch

    tensors = dict(index.tensors)
    stored: dict[str, Stored4bit] = {}
    reader = TensorReader()
    try:
        for key in [k for k in index.tensors if ".quant_state.bitsandbytes__" in k]:
            name = key.split(".quant_state.")[0]
            try:
                state = json.loads(bytes(reader.read(index.tensors[key]).tolist()).decode())
                nested = "nested_offset" in state
                entry = tensors[name]
                stored[name] = Stored4bit(
                    packed=entry,
                    absmax=tensors[f"{name}.absmax"],
                    quant_map=tensors[f"{name}.quant_map"],
                    quant_type=state["quant_type"],
                    blocksize=int(state["blocksize"]),
                    shape=tuple(int(x) for x in state["shape"]),
                    dtype=st_dtype(getattr(torch, state["dtype"])),
                    nested_absmax=tensors.get(f"{name}.nested_absmax") if nested else None,
                    nested_quant_map=tensors.get(f"{name}.nested_quant_map") if nested else None,
                    nested_blocksize=int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
                    offset=float(state.get("nested_offset", 0.0)),
                )
            except (KeyError, ValueError, AttributeError, UnicodeDecodeError) as e:
                raise InputError(
                    f"{index.folder}: cannot read the bitsandbytes state of {name} ({e})",
                    hint="the 4-bit checkpoint is incomplete or from an unknown bitsandbytes version",
                ) from e
            del tensors[key]
            for suffix in _STAT_SUFFIXES:
                tensors.pop(name + suffix, None)
            tensors[name] = TensorEntry(
                name=name,
                file=entry.file,
                dtype=stored[name].dtype,
                shape=stored[name].shape,
                start=entry.start,
                end=entry.end,
            )
    finally:
        reader.close()
    return ShardIndex(index.folder, index.files, tensors), stored


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes' packed 4-bit codes (two per byte, high nibble first) as one uint8 per value."""
    import torch

    u = packed.reshape(-1).view(torch.uint8)
    indices = torch.empty(u.numel() * 2, dtype=torch.uint8)
    indices[::2], indices[1::2] = u >> 4, u & 0xF
    return indices[:n]


def dequantize_bnb_layer(weight) -> tuple[torch.Tensor, bool]:
    """The float32 weight of a loaded bitsandbytes ``Linear4bit`` (its ``Params4bit`` and ``quant_state``), and
    whether bitsandbytes' own ``dequantize_4bit`` agreed with code x absmax on it.

    The codes and statistics are bitsandbytes' own; the value they stand for is the code book entry times its
    block's absmax. bitsandbytes 0.50's CPU kernel on AVX512/AMX CPUs returns other values where a row is not a
    multiple of the block size; then code x absmax is returned and the flag says bitsandbytes was wrong here.
    """
    import torch
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize

    state = weight.quant_state
    n = 1
    for d in state.shape:
        n *= d
    nested = getattr(state, "nested", False)
    q = Quantized4bit(
        indices=unpack_4bit(weight.data, n),
        absmax=state.absmax,
        shape=tuple(state.shape),
        absmax2=state.state2.absmax.float() if nested else None,
        offset=float(state.offset) if nested else 0.0,
    )
    expected = dequantize_4bit(q, state.quant_type, state.blocksize)
    dtype, state.dtype = state.dtype, torch.float32  # bitsandbytes' float32 product, before any cast
    try:
        theirs = bnb_dequantize(weight.data, state).float().reshape(expected.shape)
    finally:
        state.dtype = dtype
    agrees = bool(torch.equal(theirs, expected))
    return (theirs if agrees else expected), agrees


def dequantize_stored(s: Stored4bit, reader: TensorReader) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit layer computes with, from the checkpoint's own tensors."""

    n = 1
    for d in s.shape:
        n *= d
    indices = unpack_4bit(reader.read(s.packed), n)
    absmax = reader.read(s.absmax)
    if s.nested_absmax is not None and s.nested_quant_map is not None:
        nested_map = reader.read(s.nested_quant_map).float()
        absmax = _expand(nested_map[absmax.long()], reader.read(s.nested_absmax).float(), s.nested_blocksize) + s.offset
    values = reader.read(s.quant_map).float()[indices.long()]
    return _expand(values, absmax.float(), s.blocksize).reshape(s.shape)
