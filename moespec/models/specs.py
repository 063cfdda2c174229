"""One record per Hugging Face MoE family: what moespec must know about its router.

Every family whose experts transformers declares with ``use_experts_implementation`` runs
them through moespec's experts implementation (:mod:`moespec.models.experts`), so the experts
need no record. What differs is the router: where it sits in the block, what its output holds,
how it scores (softmax or sigmoid), and for expert parallelism the correction bias, grouped
top-k and routed scaling. :data:`DEFAULT_SPEC` fits most families; :data:`SPECS` lists the
others by ``model_type``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..hooks import ROUTER_NAMES, is_hf_experts

_MISSING = object()


@dataclass(frozen=True)
class MoESpec:
    """What differs between MoE families (all attribute names are looked up on the block).

    ``score_func`` ``None``: sigmoid when the router has a correction bias, else softmax.
    ``router_output``: what element 0 of the router's output (or the output itself) holds.
    ``model_aux_loss``: whether the model adds a load-balancing loss of its own
    (``config.output_router_logits``).
    """

    router: tuple[str, ...] = ROUTER_NAMES
    router_output: str = "logits"  # "logits" | "probs"
    score_func: str | None = None
    correction_bias: tuple[str, ...] = ("e_score_correction_bias",)
    num_groups: tuple[str, ...] = ("n_group", "num_group")
    topk_groups: tuple[str, ...] = ("topk_group",)
    routed_scaling: tuple[str, ...] = ("routed_scaling_factor",)
    norm_topk: tuple[str, ...] = ("norm_topk_prob",)
    shared_experts: tuple[str, ...] = ("shared_experts", "shared_expert", "shared_mlp")
    shared_gate: tuple[str, ...] = ("shared_expert_gate",)
    model_aux_loss: bool = True


DEFAULT_SPEC = MoESpec()
_SIGMOID_NO_AUX = MoESpec(score_func="sigmoid", model_aux_loss=False)

SPECS: dict[str, MoESpec] = {
    "deepseek_v3": _SIGMOID_NO_AUX,
    "glm4_moe": _SIGMOID_NO_AUX,
    "glm4_moe_lite": _SIGMOID_NO_AUX,
    "glm4v_moe": _SIGMOID_NO_AUX,
    "dots1": _SIGMOID_NO_AUX,
    "afmoe": MoESpec(score_func="sigmoid"),
    "gemma4": MoESpec(router_output="probs"),
    "diffusion_gemma": MoESpec(router_output="probs"),
}


#: the layout flags of a transformers experts class that moespec's experts implementation reads
EXPERTS_LAYOUT_FLAGS = (
    "is_concatenated",
    "is_transposed",
    "has_bias",
    "has_gate",
    "has_post_expert_norm",
)


def spec_for(model_type: str) -> MoESpec:
    """The spec of ``model_type`` (the default when the family needs no record of its own)."""
    return SPECS.get(model_type, DEFAULT_SPEC)


def first_attr(obj: Any, names: tuple[str, ...], default: Any = None) -> Any:
    """The first of ``names`` that ``obj`` has (and is not ``None``), else ``default``."""
    for name in names:
        value = getattr(obj, name, _MISSING)
        if value is not _MISSING and value is not None:
            return value
    return default


def router_of(block: nn.Module, spec: MoESpec) -> nn.Module | None:
    """The router module of a transformers MoE block, or ``None`` when it has none."""
    router = first_attr(block, spec.router)
    return router if isinstance(router, nn.Module) and not is_hf_experts(router) else None


def with_overrides(spec: MoESpec, **changes: Any) -> MoESpec:
    """A copy of ``spec`` with some fields changed (for a user's own family)."""
    return dataclasses.replace(spec, **changes)


# Families the coverage script (scripts/hf_coverage.py) verified end to end; see docs/hf_models.md.
COVERED_MODEL_TYPES: tuple[str, ...] = (
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "jamba",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
)
