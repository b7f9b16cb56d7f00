"""The float32 value of one planned output tensor, from the base and the adapters' tensors.

The one definition of "what the merged tensor is", shared by the streaming writer (:mod:`.execute`), which
computes it tensor by tensor, and the quantization quality check (:mod:`.quality`), which builds the unquantized
merged model from it without a second copy on disk.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lora_deploy.merge.compute import apply_dora, expert_delta, lora_delta
from lora_deploy.merge.nf4 import Stored4bit, dequantize_stored, roundtrip_4bit
from lora_deploy.merge.plan import LowRankUpdate, TensorPlan

if TYPE_CHECKING:
    import torch

    from lora_deploy.model.shards import TensorReader


def update_delta(d: LowRankUpdate, adapter_tensors: list[dict]) -> torch.Tensor:
    """One update's s * delta in the storage orientation of the tensor it lands in (before the user's weight)."""
    ts = adapter_tensors[d.adapter]
    if d.kind != "experts":
        delta = lora_delta(ts[d.a_key], ts[d.b_key], d.scale, d.kind)
        return delta if d.part is None else d.part.take(delta)
    part = d.part
    if part is not None and part.box[0][1] - part.box[0][0] == 1:
        # a per-expert checkpoint tensor: compute that expert's delta only, not all E of them
        e = part.box[0][0]
        delta = expert_delta(
            ts[d.a_key], ts[d.b_key], scale=d.scale, experts=d.experts, transposed=d.transposed, only=e
        )
        part = replace(part, box=((0, 1),) + part.box[1:])
    else:
        delta = expert_delta(ts[d.a_key], ts[d.b_key], scale=d.scale, experts=d.experts, transposed=d.transposed)
    return delta if part is None else part.take(delta)


def compute_value(p: TensorPlan, reader: TensorReader, adapter_tensors: list[dict]) -> torch.Tensor:
    """The float32 value of one output tensor: base (or replacement), token rows, deltas, DoRA, biases."""
    import torch

    if p.replacement is not None:
        i, key = p.replacement
        t = adapter_tensors[i][key].float().clone()
    else:
        if isinstance(p.fourbit, Stored4bit):
            t = dequantize_stored(p.fourbit, reader)
        else:
            t = reader.read(p.base_entry)
            if not t.is_floating_point():
                return t
            t = roundtrip_4bit(t, p.fourbit) if p.fourbit is not None else t.float()
    for rows in p.rows:
        idx = torch.tensor(rows.indices, dtype=torch.long)
        t.index_copy_(0, idx, adapter_tensors[rows.adapter][rows.key].float())
    for d in p.deltas:
        delta = update_delta(d, adapter_tensors).reshape(t.shape)
        t += delta if d.weight == 1.0 else d.weight * delta
    if p.dora is not None:
        d, magnitude_key = p.dora
        t = apply_dora(t, update_delta(d, adapter_tensors), adapter_tensors[d.adapter][magnitude_key], d.kind)
    for b in p.biases:
        bias = adapter_tensors[b.adapter][b.key].float() * b.scale
        t += bias if b.weight == 1.0 else b.weight * bias
    return t
