"""A deploy spec's choices against a capacity plan: what it gets wrong (``plan --spec``), or what it leaves
unsaid filled in from the plan (``manifests --size-from-plan``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lora_deploy.errors import InputError
from lora_deploy.k8s.spec import DeploySpec, quantity_value
from lora_deploy.plan.capacity import CapacityPlan, PlanRequest, tp_ok
from lora_deploy.plan.shape import GIB
from lora_deploy.serve.settings import EngineSettings, LoraSettings


@dataclass(frozen=True, kw_only=True)
class SpecCheck:
    """What a deploy spec gets wrong for its model and GPU: problems (vLLM would fail) and warnings."""

    spec: str
    gpu: str
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    plan: CapacityPlan

    @property
    def passed(self) -> bool:
        return not self.problems


def request_for_spec(
    spec: DeploySpec,
    *,
    base: str | None = None,
    gpu: str | None = None,
    gpu_memory_gib: float | None = None,
    lora: LoraSettings = LoraSettings(),
    engine: EngineSettings = EngineSettings(),
    **overrides: Any,
) -> PlanRequest:
    """The plan a deploy spec implies: its model (or ``base``, a readable copy), and the settings records of the
    very :class:`ServeConfig` its servers are rendered from (adapter ranks from the spec or the adapter folders, the
    store's rank limit and runtime slot), so the plan sizes the flags the manifests run. The fields ``lora`` and
    ``engine`` set (what ``plan`` was also given) override the spec's."""
    from lora_deploy.k8s.workload import resolve_ranks, server_config

    adapters = resolve_ranks(spec) if spec.mode == "dynamic" else ()
    cfg = server_config(spec, adapters)
    limits = cfg.lora_limits
    limits = replace(limits, settings=limits.settings.model_copy(update=lora.model_dump(exclude_none=True)))
    given = engine.model_dump(exclude_none=True, exclude={"dtype"} if engine.dtype == "auto" else set())
    return PlanRequest(
        base=base or spec.model,
        lora=limits,
        engine=spec.vllm.engine.model_copy(update=given),
        gpus=(gpu,) if gpu else (),
        gpu_memory_gib=gpu_memory_gib,
        pipeline_parallel=spec.multi_node.nodes,
        **{k: v for k, v in overrides.items() if v is not None},
    )


def check_spec(spec, plan: CapacityPlan, source: str = "spec") -> SpecCheck:
    """Compare the spec's GPUs, tensor parallelism, LoRA limits and pod memory with ``plan`` (its first GPU)."""
    g = plan.gpus[0]
    problems, warnings = [], []
    tp = spec.tensor_parallel_size
    shape = plan.shape
    if not tp_ok(shape, tp):
        problems.append(
            f"tensorParallelSize {tp} does not divide the model's {shape.heads} attention heads "
            f"({shape.kv_heads} KV heads): vLLM refuses to start"
        )
    if g.tensor_parallel_size is None:
        problems.append(f"{plan.base} does not fit on 8 x {g.gpu} with max_model_len {plan.max_model_len}")
    elif tp < g.tensor_parallel_size:
        problems.append(
            f"vllm.tensorParallelSize {tp} (gpus {spec.gpus}) is too small: on {g.gpu} the model needs "
            f"{g.tensor_parallel_size} ({plan.weights_bytes / GIB:.1f} GiB of weights)"
        )
    elif tp > g.tensor_parallel_size:
        warnings.append(f"tensorParallelSize {tp} where {g.tensor_parallel_size} fits: more KV cache, more GPUs")
    if spec.mode == "dynamic" and plan.adapters:
        if spec.vllm.max_loras is not None and spec.vllm.max_loras < len(plan.adapters):
            warnings.append(
                f"vllm.maxLoras {spec.vllm.max_loras} is below the {len(plan.adapters)} adapters: vLLM "
                "swaps adapters in and out of the slots, and requests wait for one"
            )
        ranks = [a.rank for a in spec.adapters if a.rank]
        if spec.max_lora_rank is not None and ranks and max(ranks) > spec.max_lora_rank:
            problems.append(
                f"maxLoraRank {spec.max_lora_rank} is below an adapter's rank {max(ranks)}: vLLM refuses to load it"
            )
    pod_memory = quantity_value(spec.resources.memory)
    need = g.weights_bytes_per_gpu * (g.tensor_parallel_size or tp)
    if pod_memory is None:
        warnings.append(
            f"resources.memory {spec.resources.memory!r} is not a Kubernetes quantity, so whether a pod "
            f"can load its {need / GIB:.1f} GiB of weights was not checked"
        )
    elif pod_memory < need:
        warnings.append(
            f"resources.memory {spec.resources.memory} is below the weights one pod loads "
            f"({need / GIB:.1f} GiB): loading may be OOM-killed"
        )
    return SpecCheck(spec=source, gpu=g.gpu, problems=tuple(problems), warnings=tuple(warnings), plan=plan)


def sized_spec(spec: DeploySpec, plan: CapacityPlan, given: set[str]) -> tuple[DeploySpec, list[str]]:
    """``spec`` with what it does not say sized from ``plan``'s first GPU: ``gpus`` and ``vllm.tensorParallelSize``
    (the tensor parallelism needed), ``vllm.maxModelLen`` and ``resources.memory`` (the weights one pod reads, plus
    a quarter and 8 GiB of headroom; at least 16Gi). Keys in ``given`` (the spec's own, dotted camelCase) stay."""
    g = plan.gpus[0]
    if g.tensor_parallel_size is None:
        raise InputError(f"{plan.base} does not fit on 8 x {g.gpu}: nothing to size", hint=" ".join(g.notes))
    notes = []
    tp = g.tensor_parallel_size
    if "gpus" not in given and "vllm.tensorParallelSize" not in given:
        spec = spec.model_copy(update={"gpus": tp, "vllm": spec.vllm.model_copy(update={"tensor_parallel_size": tp})})
        notes.append(f"gpus and tensorParallelSize {tp} (the plan for {g.gpu})")
    if "vllm.maxModelLen" not in given:
        spec = spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"max_model_len": plan.max_model_len})})
        notes.append(f"maxModelLen {plan.max_model_len}")
    if "resources.memory" not in given:
        memory_gib = max(16, math.ceil(g.weights_bytes_per_gpu * spec.tensor_parallel_size * 1.25 / GIB) + 8)
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"memory": f"{memory_gib}Gi"})})
        notes.append(f"memory {memory_gib}Gi (the weights a pod reads, +25% and 8Gi)")
    return spec, notes
