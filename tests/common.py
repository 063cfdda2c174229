"""What several test files share: the repository root and the tiny model configs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A tiny dense decoder (Llama / Qwen2 keys): the text part of the head-controller test models.
DENSE_TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

#: A tiny vision tower (CLIP or SigLIP keys) of 16x16 images in 4x4 patches: 16 image tokens.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
)

#: The shared text part of the tiny HF MoE models the family tests build from a config.
TINY_MOE_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)
#: Per family: the MoE keys of a 4-expert, top-2 model (shared experts where it has them).
TINY_MOE_ARCHS = {
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        head_dim=8,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        shared_expert_intermediate_size=24,
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_shared_experts=1,
    ),
}
