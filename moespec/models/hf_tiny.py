"""Tiny random transformers MoE models built from their config classes (tests, coverage).

:func:`moe_model_types` lists every model type of the installed transformers whose modeling
code declares experts with ``use_experts_implementation``; :func:`tiny_moe_model` builds one
of them small (2 layers, hidden 32, 4 experts, top-2), language model only for multimodal
families, with every layer an MoE layer where the config says which layers are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks import find_moe_blocks

SMALL: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "ffn_hidden_size": 48,
    "max_position_embeddings": 64,
    # experts: the config names them in many ways
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "n_group": 2,
    "topk_group": 1,
    "num_expert_group": 2,
    "first_k_dense_replace": 0,
    "moe_layer_start_index": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "expert_layer_period": 1,
    "expert_layer_offset": 0,
    "moe_layer_freq": 1,
    "num_shared_experts": 1,
    "n_shared_experts": 1,
    # attention variants (MLA, linear attention, state-space layers)
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "qk_head_dim": 8,
    "v_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "mamba_d_state": 8,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": 4,
    "sliding_window": 16,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}


def moe_model_types() -> list[str]:
    """Model types whose modeling module declares experts with ``use_experts_implementation``."""
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )

    root = Path(importlib.util.find_spec("transformers.models").origin).parent  # type: ignore[arg-type]
    out = []
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        path = root / module / f"modeling_{module}.py"
        if path.is_file() and "@use_experts_implementation" in path.read_text():
            out.append(model_type)
    return out


def _short_layer_list(values: list, n: int) -> list:
    """``n`` entries of a per-layer list: one of each kind first (attention and linear...)."""
    if any(str(v) in ("sparse", "moe") for v in values):
        return ["sparse" if "sparse" in map(str, values) else "moe"] * n
    kinds = list(dict.fromkeys(values))
    return [kinds[i % len(kinds)] for i in range(n)]


def _text_key(config: Any) -> str | None:
    text = config.get_text_config()
    if text is config:
        return None
    return next((k for k, v in config.__dict__.items() if v is text), "text_config")


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The text config of ``model_type`` with :data:`SMALL` sizes where the config has them."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text = default.get_text_config()
    known = set(text.__dict__) | set(getattr(type(text), "__dataclass_fields__", {}))
    kw = {k: v for k, v in SMALL.items() if k in known and k != "q_lora_rank"}
    if "q_lora_rank" in known and text.__dict__.get("q_lora_rank") is None:
        kw.pop("q_lora_rank", None)
    n = int(kw.get("num_hidden_layers", 2))
    for key in ("layer_types", "mlp_layer_types"):
        value = getattr(text, key, None)
        if isinstance(value, list) and value:
            kw[key] = _short_layer_list(value, n)
    pattern = getattr(text, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and pattern:
        kw["hybrid_override_pattern"] = "".join(_short_layer_list(list(dict.fromkeys(pattern)), n))
    kw.update(overrides)
    key = _text_key(default)
    if key is None:
        return AutoConfig.for_model(model_type, **kw)
    config = AutoConfig.for_model(model_type, **{key: {**text.to_dict(), **kw}})
    return config.get_text_config()


def tiny_moe_model(model_type: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random float32 causal LM of ``model_type`` (its language model when multimodal).

    Router weights get a wide init so that routing differs between tokens.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for _, block in find_moe_blocks(model):
            for attr in ("gate", "router"):
                router = getattr(block, attr, None)
                if isinstance(router, nn.Module):
                    for p in router.parameters():
                        p.normal_(0, 0.5)
            for name, buf in block.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0, 0.3)
    return model
