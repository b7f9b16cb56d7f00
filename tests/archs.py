"""Tiny random models of many transformers architecture families, built from their own config classes.

One generic table of small sizes serves every naming convention (hidden_size / n_embd / d_model ...):
only keys the model type's default config has are set. Extras fix per-family arithmetic (MLA ranks,
rotary dims). The models are saved with ``save_pretrained``, so each checkpoint has the layout transformers
itself writes (per-expert tensors for Mixtral and the Qwen-MoE family, renamed ones for GPT-NeoX...).
"""

from __future__ import annotations

from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, INTER, EXPERTS = 64, 2, 4, 2, 16, 256, 96, 4
GENERIC = {
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "num_hidden_layers": LAYERS,
    "n_layer": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_kv_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "intermediate_size": INTER,
    "n_inner": INTER,
    "ffn_dim": INTER,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "max_seq_len": 128,
    "num_local_experts": EXPERTS,
    "num_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "sliding_window": 16,
    "max_window_layers": LAYERS,
}
EXTRAS = {
    "deepseek_v3": dict(
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    "gptj": dict(rotary_dim=8),
    "falcon": dict(new_decoder_architecture=False, multi_query=True),
    "gemma2": dict(query_pre_attn_scalar=HEAD_DIM),
    "gemma3_text": dict(query_pre_attn_scalar=HEAD_DIM),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"]),
}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    kwargs = {k: v for k, v in GENERIC.items() if k in defaults}
    kwargs.update({k: v for k, v in TOKEN_IDS.items() if defaults.get(k) is not None})
    kwargs.update(EXTRAS.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_arch(folder: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random ``model_type`` model to ``folder``; every float tensor is randomised (no zero inits)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point():
                p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name and p.dim() == 1 else 0.0))
    model.save_pretrained(folder)
    return folder
