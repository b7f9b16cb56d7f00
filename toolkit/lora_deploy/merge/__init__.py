"""The merge engine: fold one or more LoRA adapters into a base checkpoint, streaming and exact.

``W' = W + sum_i w_i * s_i * (B_i @ A_i)`` is computed in float32 and rounded once into the output
dtype, one tensor at a time; untouched tensors are copied byte for byte. Three steps, one module each:

- :mod:`.plan` validates everything from headers and configs and freezes a :class:`MergePlan`;
- :mod:`.compute` is the tensor math (LoRA, DoRA, fused experts), pure functions of tensors;
- :mod:`.execute` streams the base, writes shards into a staged folder, hashes inputs and commits.
"""

from lora_deploy.merge.compute import apply_dora, expert_delta, lora_delta, merge_weight
from lora_deploy.merge.execute import PROVENANCE_FILE, MergeReport, execute_plan, run_merge
from lora_deploy.merge.plan import (
    MergeConfig,
    MergePlan,
    ModuleMerge,
    TensorPlan,
    fit_problems,
    normalize_dtype,
    plan_merge,
)

__all__ = [
    "MergeConfig",
    "MergePlan",
    "MergeReport",
    "ModuleMerge",
    "TensorPlan",
    "PROVENANCE_FILE",
    "apply_dora",
    "execute_plan",
    "expert_delta",
    "fit_problems",
    "lora_delta",
    "merge_weight",
    "normalize_dtype",
    "plan_merge",
    "run_merge",
]
