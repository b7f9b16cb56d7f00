"""The merge's tensor math: pure functions of tensors, no files, no plans of other modules' making.

Every delta is computed in float32 in the base weight's storage orientation and added to the float32
base value; the result is rounded once into the output dtype by the caller.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora_deploy.errors import InputError

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, kind: str) -> torch.Tensor:
    """s * (B @ A) in the base weight's storage orientation (transposed for Conv1D and Embedding), float32."""
    d = b.float() @ a.float()
    if kind in ("conv1d", "embedding"):
        d = d.T
    return d * scale


def expert_delta(
    a: torch.Tensor, b: torch.Tensor, *, scale: float, experts: int, transposed: bool, only: int | None = None
) -> torch.Tensor:
    """The delta PEFT's ParamWrapper adds to a fused 3-D expert parameter, float32, shape [E, ., .].

    PEFT stores one rank-r pair per expert along the rank axis, ordered differently in the two factors
    (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight): A is [E*r, in] expert-major (row e*r + k),
    B is [out, r*E] rank-major (column k*E + e). Expert e's update is ``B[:, e::E] @ A[e*r:(e+1)*r]``
    ([out, in]), transposed when the parameter is stored [E, in, out] (``transposed``), scaled by s.
    ``only`` computes a single expert's slice ([1, ., .]) for checkpoints that store experts one by one.
    """
    import torch

    r = a.shape[0] // experts
    a3 = a.float().reshape(experts, r, a.shape[1])  # [E, r, in]
    b3 = b.float().reshape(b.shape[0], r, experts).permute(2, 0, 1)  # [E, out, r]
    if only is not None:  # one expert, as [1, ., .]
        a3, b3 = a3[only : only + 1], b3[only : only + 1]
    d = torch.bmm(b3, a3)  # [E, out_e, in_e]
    if transposed:
        d = d.transpose(1, 2)
    return d * scale


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, kind: str) -> torch.Tensor:
    """DoRA: m / ||W + dW|| * (W + dW), norms per output row (Linear/Conv1D) or per embedding column."""
    import torch

    merged = weight + delta
    if kind == "embedding":
        norm = torch.linalg.norm(merged, dim=0)
        return (magnitude.float() / norm).view(1, -1) * merged
    rows = merged.T if kind == "conv1d" else merged
    factor = (magnitude.float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
    return (factor * rows).T if kind == "conv1d" else factor * rows


def merge_weight(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, *, kind: str = "linear", weight: float = 1.0
) -> torch.Tensor:
    """W + weight * s * (B @ A) in float32: the single-module merge, for callers outside the streaming engine."""
    d = lora_delta(a, b, scale, kind)
    return base.float() + (d if weight == 1.0 else weight * d)


def check_range(name: str, lo: float, hi: float, dtype: str) -> None:
    """Refuse NaN/Inf results, and values that float16 cannot hold (they would silently become Inf)."""
    if any(math.isnan(v) or math.isinf(v) for v in (lo, hi)):
        raise InputError(
            f"merged tensor {name} has NaN or Inf values",
            hint="check the base and adapter for corrupt values",
        )
    peak = max(abs(lo), abs(hi))
    if dtype == "float16" and peak > FP16_MAX:
        raise InputError(
            f"merged tensor {name} reaches {peak:.6g}, beyond float16's range (65504)",
            hint="write the merge with --dtype bfloat16 or float32",
        )


def minmax(t: torch.Tensor) -> tuple[float, float]:
    import torch

    if t.numel() == 0:
        return 0.0, 0.0
    mn, mx = torch.aminmax(t.float())
    return float(mn), float(mx)


class Workspace:
    """Float32 buffers reused from tensor to tensor, so the merge touches the same memory over and over.

    Fresh allocations for every tensor would page-fault their way through memory; these grow to the
    largest tensor once. Row blocks of ``block_elems`` keep the float32 work inside the CPU cache.
    """

    def __init__(self, block_elems: int = 1 << 18):
        import torch

        self.out = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self.block = torch.empty(block_elems, dtype=torch.float32)
        self.delta = torch.empty(block_elems, dtype=torch.float32)

    def output(self, numel: int, dtype: torch.dtype, slot: int) -> torch.Tensor:
        """Output buffer ``slot`` (0 or 1): one is filled while the writer thread drains the other."""
        import torch

        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if self.out[slot].numel() < nbytes:
            self.out[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self.out[slot][:nbytes].view(dtype)


def add_low_rank_blocked(
    src: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor, float, float]], out: torch.Tensor, ws: Workspace
) -> tuple[float, float]:
    """out = round(src + sum_i w_i * s_i * (L_i @ R_i)), row block by row block; returns the float32 min/max.

    ``factors`` are (L [rows, r], R [r, cols], s, w) in the storage orientation of ``src``. Each
    block's delta is the same rows of the full ``L @ R`` (bitwise: the rank-r dot products do not depend
    on the blocking), so this equals the whole-tensor computation exactly.
    """
    import torch

    numel = src.numel()
    if src.dim() == 2:
        rows, cols = src.shape
    else:
        rows, cols = 1, numel
        src = src.reshape(1, numel)
    step = max(1, ws.block.numel() // cols) if cols <= ws.block.numel() else 1
    out2d = out.view(rows, cols)
    lo, hi = float("inf"), float("-inf")
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if cols > ws.block.numel():  # a single row larger than the block buffer: use a temporary
            blk = src[r0:r1].float()
        else:
            blk = ws.block[: (r1 - r0) * cols].view(r1 - r0, cols)
            blk.copy_(src[r0:r1])
        for left, right, scale, weight in factors:
            d = ws.delta[: blk.numel()].view_as(blk) if blk.numel() <= ws.delta.numel() else torch.empty_like(blk)
            torch.matmul(left[r0:r1], right, out=d)
            d.mul_(scale)
            if weight != 1.0:
                d.mul_(weight)
            blk.add_(d)
        mn, mx = torch.aminmax(blk)
        lo, hi = min(lo, float(mn)), max(hi, float(mx))
        if lo != lo or hi != hi:
            break
        out2d[r0:r1].copy_(blk)
    return lo, hi
