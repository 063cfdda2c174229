"""ZeRO stage 3 for MoE models: which combinations DeepSpeed can run, leaf blocks, export.

ZeRO-3 partitions every parameter and gathers a module's own parameters when it runs. A MoE
block's experts run in a data-dependent order, and moespec's router probe reads the fused
expert weights from inside the block's gate: so each MoE block is registered as a ZeRO-3 leaf
module (``deepspeed.utils.set_z3_leaf_modules``), whose parameters, experts included, are all
gathered when the block starts. DeepSpeed 0.19 refuses its own MoE layers under stage 3
("Native DeepSpeed MoE is not supported with ZeRO Stage 3", ``DeepSpeedEngine``), so expert
parallelism (``moe.backend=deepspeed``, whatever ``moe.ep_size``) is refused with stage 3.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..hooks import find_moe_blocks

log = logging.getLogger("moespec")


def zero3_problem(cfg: Any) -> str | None:
    """Why the recipe cannot run with ``deepspeed.zero_stage=3`` (``None``: it can)."""
    if cfg.moe.backend == "autoep":
        return (
            "deepspeed.zero_stage=3 with moe.backend=autoep: moespec runs DeepSpeed AutoEP with "
            "ZeRO stage 0, 1 or 2 (stage 3 is not verified); use deepspeed=zero2"
        )
    if cfg.moe.backend == "deepspeed":
        return (
            "deepspeed.zero_stage=3 with moe.backend=deepspeed: DeepSpeed 0.19 runs its MoE "
            "layers (expert parallel, any moe.ep_size) with ZeRO stage 0, 1 or 2 only; use "
            "deepspeed=zero2, or moe.backend=native with moe.ep_size=1"
        )
    if cfg.model.type != "hf":
        return (
            f"deepspeed.zero_stage=3 with model.type={cfg.model.type}: ZeRO-3 is for Hugging "
            "Face models (model=hf); the tiny model trains with ZeRO stage 0, 1 or 2"
        )
    return None


def register_leaf_blocks(model: nn.Module) -> list[str]:
    """Mark every MoE block of ``model`` as a ZeRO-3 leaf module; returns their class names."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(block) for _, block in find_moe_blocks(model)}, key=str)
    if not classes:
        raise ValueError(
            f"deepspeed.zero_stage=3: no MoE blocks found in {type(model).__name__} to register "
            "as ZeRO-3 leaf modules"
        )
    set_z3_leaf_modules(model, classes)
    names = [c.__name__ for c in classes]
    log.info(
        "ZeRO-3: MoE blocks %s are leaf modules (all their parameters gathered at once)", names
    )
    return names


def is_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 holds the parameters of ``model`` partitioned."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter of a ZeRO-3 model is whole on every rank (changes are dropped
    on leaving); nothing happens for a model that is not partitioned."""
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


__all__ = ["gathered", "is_partitioned", "register_leaf_blocks", "zero3_problem"]
