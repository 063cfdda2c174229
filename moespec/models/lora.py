"""LoRA adapters (peft) for transformers MoE models: linear modules, fused experts, router.

``model.lora.target_modules`` puts peft's ``lora.Linear`` on linear modules (attention by
default). ``model.lora.experts`` adapts the fused 3-D expert weights [E,…] of every MoE block
through peft's ``target_parameters`` (one rank-r update per expert), and
``model.lora.router_lora`` adapts the router weight the same way instead of training it in
full. peft applies such parameter adapters only while the wrapped module runs; moespec's
router probe reads the expert weights outside that call, so it reads them under
:func:`adapted`. Export merges every adapter (``merge_adapter``) and drops peft's names.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..hooks import ROUTER_NAMES, base_module, find_moe_blocks

logger = logging.getLogger("moespec")


def _param_wrapper_class() -> type | None:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # peft not installed: nothing can be wrapped
        return None
    return ParamWrapper


@contextlib.contextmanager
def adapted(module: Any) -> Iterator[Any]:
    """Inside, the parameters that peft's ``ParamWrapper`` chain around ``module`` adapts read
    as ``W + ΔW`` (differentiable in the adapters); yields the unwrapped module."""
    wrapper = _param_wrapper_class()
    with contextlib.ExitStack() as stack:
        while wrapper is not None and isinstance(module, wrapper):
            if not module.disable_adapters and not module.merged:
                stack.enter_context(module._activate_lora(module.active_adapters))
            module = module.base_layer
        yield module


def plain_name(key: str) -> str:
    """A state-dict key of the peft-wrapped model as plain transformers names it."""
    return re.sub(r"\.(base_layer\.)+", ".", key)


def _gate_name(block: nn.Module) -> str | None:
    for attr in ROUTER_NAMES:
        gate = base_module(getattr(block, attr, None))
        if isinstance(gate, nn.Module) and isinstance(getattr(gate, "weight", None), nn.Parameter):
            return attr
    return None


def lora_gates(model: nn.Module) -> list[nn.Module]:
    """The router module of every MoE block of ``model`` (unwrapped)."""
    out = []
    for _, block in find_moe_blocks(model):
        attr = _gate_name(block)
        if attr is not None:
            out.append(base_module(getattr(block, attr)))
    return out


def _parameter_targets(model: nn.Module, lora_cfg: Any) -> list[str]:
    """Full names of the 3-D expert weights and router weights that ``lora_cfg`` adapts."""
    targets: list[str] = []
    for name, block in find_moe_blocks(model):
        if lora_cfg.experts:
            experts = getattr(block, "experts", None)
            fused = [
                n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3
            ] if isinstance(experts, nn.Module) else []  # fmt: skip
            if not fused:
                raise ValueError(
                    f"model.lora.experts=true but {name} ({type(block).__name__}) holds no fused "
                    "3-D expert weights (expert-parallel blocks and per-expert modules have none; "
                    "use moe.backend=native, or target_modules for per-expert linear layers)"
                )
            targets += [f"{name}.experts.{n}" for n in fused]
        if lora_cfg.router_lora:
            attr = _gate_name(block)
            if attr is None:
                raise ValueError(
                    f"model.lora.router_lora=true but {name} ({type(block).__name__}) has no "
                    "'gate' or 'router' module with a weight"
                )
            targets.append(f"{name}.{attr}.weight")
    return targets


def _check(model: nn.Module, lora_cfg: Any, targets: list[str]) -> None:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in lora_cfg.target_modules if t not in names]
    if unknown:
        raise ValueError(
            f"model.lora.target_modules {unknown} match no module of {type(model).__name__}; "
            f"e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}"
        )
    if not lora_cfg.target_modules and not targets:
        raise ValueError(
            "model.lora.enabled=true adapts nothing: model.lora.target_modules is empty and "
            "model.lora.experts and model.lora.router_lora are false"
        )
    if targets and lora_cfg.dropout:
        raise ValueError(
            f"model.lora.dropout={lora_cfg.dropout} with model.lora.experts or router_lora: "
            "peft's parameter adapters take no dropout; set model.lora.dropout=0"
        )


def apply_lora(model: nn.Module, lora_cfg: Any) -> nn.Module:
    """peft LoRA adapters as ``lora_cfg`` chooses; the full router weights train when
    ``train_router`` (and no router adapter) asks for it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from ..routing.router import Router

    targets = _parameter_targets(model, lora_cfg)
    _check(model, lora_cfg, targets)
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        target_parameters=targets or None,
        bias="none",
    )
    gates = [g.weight for g in lora_gates(model)]
    gates += [m.weight for m in model.modules() if isinstance(m, Router)]  # expert parallel
    peft_model = get_peft_model(model, peft_cfg)
    full_router = bool(lora_cfg.train_router) and not lora_cfg.router_lora
    for p in gates:
        p.requires_grad_(full_router)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(
        "LoRA rank %d on %s%s%s; router weights %s (%d); %d trainable parameters",
        lora_cfg.rank,
        list(lora_cfg.target_modules),
        ", the fused expert weights" if lora_cfg.experts else "",
        ", the routers" if lora_cfg.router_lora else "",
        "trainable" if full_router else "frozen",
        len(gates),
        trainable,
    )
    return peft_model


__all__ = ["adapted", "apply_lora", "base_module", "lora_gates", "plain_name"]
