"""What several test files share: the repository root and the tiny dense text config."""

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
