"""Capacity planning: will this base, with these adapters, fit on that GPU, and merged or dynamic?

- :mod:`.shape`: the model's shape and its KV cache as vLLM's KV cache manager counts it;
- :mod:`.slots`: the memory vLLM reserves for LoRA slots;
- :mod:`.capacity`: the GPU catalog, tensor parallelism, the plan and the merged-vs-dynamic advice.
"""

from lora_deploy.plan.capacity import Advice, CapacityPlan, GpuPlan, PlanRequest, plan_capacity  # noqa: F401
