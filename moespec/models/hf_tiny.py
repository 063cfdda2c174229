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

from ..hooks import ROUTER_NAMES, find_moe_blocks

SMALL: dict[str, Any] = {
    "vocab_size": 64,
    "unpadded_vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "shared_experts_intermediate_size": 24,
    "shared_intermediate_size": 24,
    "moe_shared_expert_intermediate_size": 24,
    "dense_intermediate_size": 48,
    "moe_hidden_size": 16,  # muse_spark's expert width
    "router_hidden_size": 16,
    "q_lora_rank": 16,  # only where the family has a query LoRA (default not None)
    "o_lora_rank": 16,
    "swa_head_dim": 8,
    "ple_embed_dim": 16,
    "hc_lowrank": 8,
    "ssm_state_size": 8,
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
    "enable_moe_block": True,
    "n_group": 2,
    "topk_group": 1,
    "num_expert_group": 2,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
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
    "linear_head_dim": 8,  # glm5_next's delta attention (64 heads of 128 by default)
    "linear_num_heads": 4,
    "mamba_d_state": 8,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": 4,
    "sliding_window": 16,
    "index_head_dim": 8,  # sparse-attention (DSA) indexers
    "index_n_heads": 2,
    "index_topk": 4,
    "index_kpool": 4,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}


# Families whose default config cannot be built small without a value of their own.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # no default layer list
    "zaya": {"num_experts_per_tok": 1},  # the config accepts top-1 only
    "qwen4_exp": {  # its indexed-attention layers need every indexer size
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    },
}


def _modeling_source(model_type: str) -> str:
    """The source of ``model_type``'s modeling module (empty when it has none)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    root = Path(importlib.util.find_spec("transformers.models").origin).parent  # type: ignore[arg-type]
    path = root / module / f"modeling_{module}.py"
    return path.read_text() if path.is_file() else ""


def moe_families() -> dict[str, list[str]]:
    """Each MoE family (modeling module) of the installed transformers and its model types.

    A family's modeling module declares experts with ``use_experts_implementation``; its model
    types are listed with the family's own name first, then its ``*_text`` configs.
    """
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )

    families: dict[str, list[str]] = {}
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        if "@use_experts_implementation" in _modeling_source(model_type):
            families.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    for module, types in families.items():
        types.sort(key=lambda t: (t != module, not t.endswith("_text"), t))
    return families


def _short_layer_list(values: list, n: int) -> list:
    """``n`` entries of a per-layer list: one of each kind first (attention and linear...)."""
    if any(str(v) in ("sparse", "moe") for v in values):
        return ["sparse" if "sparse" in map(str, values) else "moe"] * n
    kinds = list(dict.fromkeys(values))
    return [kinds[i % len(kinds)] for i in range(n)]


def _fit(text: Any, known: set[str], kw: dict[str, Any], n: int, mrope: bool) -> None:
    """Sizes that must agree with each other (rope dims, per-layer lists, state-space heads)."""
    if "qk_rope_head_dim" in known:
        if getattr(text, "qk_rope_head_dim", None) == 0:  # no RoPE in the family's attention
            kw["qk_rope_head_dim"] = 0
        kw["head_dim"] = kw.get("qk_rope_head_dim", text.qk_rope_head_dim)
    if "index_head_dim" in known:  # MLA with an indexer: as many key/value heads as heads
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    if "mlp_layer_types" in known and getattr(text, "mlp_layer_types", None) is None:
        kw["mlp_layer_types"] = ["sparse"] * n
    if isinstance(getattr(text, "per_layer_config", None), dict):
        kw["per_layer_config"] = {
            k: v for k, v in text.per_layer_config.items() if isinstance(k, int) and k < n
        }
    for key in ("moe_intermediate_size", "moe_num_experts"):
        default = getattr(text, key, None)
        if isinstance(default, list) and key in kw:
            kw[key] = [kw[key]] * len(default)
    if "mamba_n_heads" in known:
        kw.update(mamba_n_heads=8, mamba_d_head=8)
    if "mamba_num_heads" in known:
        kw.update(mamba_num_heads=8, mamba_head_dim=8)
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if "mrope_section" in rope or mrope:  # the modeling code's default fits its own head size
        head = kw.get("qk_rope_head_dim") or kw.get("head_dim", 8)
        half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
        rope["mrope_section"] = [half // 3, half // 3, half - 2 * (half // 3)]  # h = w (ernie)
        kw["rope_parameters"] = rope


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
    kw = {k: v for k, v in SMALL.items() if k in known}
    for key in ("q_lora_rank", "o_lora_rank"):  # None: the family has no such projection
        if getattr(text, key, None) is None:
            kw.pop(key, None)
    n = int(kw.get("num_hidden_layers", 2))
    _fit(text, known, kw, n, "mrope_section" in _modeling_source(model_type))
    for key in ("layer_types", "mlp_layer_types"):
        value = getattr(text, key, None)
        settable = not isinstance(getattr(type(text), key, None), property)
        if settable and isinstance(value, list) and value:
            kw[key] = _short_layer_list(value, n)
    pattern = getattr(text, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and pattern:
        kw["hybrid_override_pattern"] = "".join(_short_layer_list(list(dict.fromkeys(pattern)), n))
    kw.update(FAMILY_OVERRIDES.get(model_type, {}))
    kw.update(overrides)
    key = _text_key(default)
    try:
        return _build_config(model_type, key, text, kw)
    except Exception as err:  # the family validates head counts: retry with plain MHA
        if "num_key_value_heads" not in str(err):
            raise
        return _build_config(model_type, key, text, {**kw, "num_key_value_heads": 4})


def _build_config(model_type: str, key: str | None, text: Any, kw: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    if key is None:
        return AutoConfig.for_model(model_type, **kw)
    layers = getattr(text, "num_hidden_layers", None)
    base = {  # per-layer lists the default derived from its own depth: derive them again
        k: v
        for k, v in text.to_dict().items()
        if not (isinstance(v, list) and layers and len(v) == layers and k not in kw)
    }
    config = AutoConfig.for_model(model_type, **{key: {**base, **kw}})
    return config.get_text_config()


def causal_lm_class(config: Any) -> type[nn.Module]:
    """The causal LM class of a (text) config; its text model when it has no LM head class."""
    import sys

    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        pass
    module = sys.modules[type(config).__module__.replace("configuration_", "modeling_")]
    owned = [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and getattr(c, "config_class", None) is type(config)
        and not c.__name__.endswith("PreTrainedModel")
    ]
    for suffix in ("ForCausalLM", "Model"):
        found = [c for c in owned if c.__name__.endswith(suffix)]
        if found:
            return found[0]
    raise ValueError(f"no causal LM or text model class for {type(config).__name__}")


def tiny_moe_model(model_type: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random float32 causal LM of ``model_type`` (its language model when multimodal).

    Router weights get a wide init so that routing differs between tokens.
    """
    import importlib

    config = tiny_config(model_type, **overrides)
    importlib.import_module(type(config).__module__.replace("configuration_", "modeling_"))
    torch.manual_seed(seed)
    model = causal_lm_class(config)._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for _, block in find_moe_blocks(model):
            for attr in ROUTER_NAMES:
                router = getattr(block, attr, None)
                if isinstance(router, nn.Module):
                    for p in router.parameters():
                        p.normal_(0, 0.5)
            for name, buf in block.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0, 0.3)
    return model.train()
