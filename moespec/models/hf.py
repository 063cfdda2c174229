"""moespec routing losses and statistics for transformers v5 MoE models.

:func:`attach` gives every MoE block of a transformers MoE model (any family whose experts
are declared with ``use_experts_implementation``) an :class:`HFRouterProbe`: a parameter-free
:class:`~moespec.routing.Router` view of the block's own router. The block's experts run
through moespec's experts implementation, once, and hand the probe each token's k raw outputs.
Nothing is added to the model's modules, parameters or outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks import ROUTER_NAMES, HookRegistry, find_moe_blocks, is_hf_experts
from ..routing import (
    CollectedLosses,
    LossConfig,
    TokenContext,
    collect_router_losses,
    collect_routing_stats,
    iter_routers,
)
from ..routing.router import ATTACHED_ROUTER_ATTR
from . import experts as X
from .probe import HFRouterProbe
from .specs import COVERED_MODEL_TYPES, MoESpec, spec_for

logger = logging.getLogger("moespec")

SUPPORTED_MODEL_TYPES = COVERED_MODEL_TYPES
_HOOK_GROUP = "moespec.hf"


def model_type_of(model: nn.Module) -> str:
    """The ``model_type`` of the (text) config of ``model`` (``"?"`` without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return "?"
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return str(getattr(config, "model_type", "?"))


def _custom_experts(model: nn.Module) -> list[str]:
    """Names of blocks with a router beside experts that transformers does not dispatch."""
    out = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        routed = any(isinstance(getattr(mod, a, None), nn.Module) for a in ROUTER_NAMES)
        if routed and isinstance(experts, nn.Module) and not is_hf_experts(experts):
            out.append(f"{name}.experts ({type(experts).__name__})")
    return out


def moe_blocks(model: nn.Module) -> tuple[str, MoESpec, list[tuple[str, nn.Module]]]:
    """The model type, its spec and its MoE blocks; a clear error when it has none moespec knows."""
    model_type = model_type_of(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        custom = _custom_experts(model)
        if custom:
            raise ValueError(
                f"{type(model).__name__} (model_type {model_type!r}): the experts of "
                f"{custom[0]} are a custom module, not transformers' use_experts_implementation "
                "experts; moespec attaches through transformers' experts dispatch only"
            )
        raise ValueError(
            f"no MoE blocks found in {type(model).__name__} (model_type {model_type!r}): moespec "
            "attaches to a router beside experts declared with transformers' "
            f"use_experts_implementation; covered model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type, spec_for(model_type), blocks


class AttachHandle:
    """The probes attached to one model; ``detach()`` (or leaving a ``with``) removes them."""

    def __init__(self, model: nn.Module, probes: list[HFRouterProbe], registry: HookRegistry):
        self.model = model
        self.routers = nn.ModuleList(probes)  # a container for moespec.routing collectors
        self._registry = registry
        self._aux_state: dict[str, Any] | None = None
        self._implementations: list[tuple[Any, Any]] = []  # (config, its previous value)
        self.attached = True

    @property
    def probes(self) -> list[HFRouterProbe]:
        """The probes, one per MoE block, in module order."""
        return list(self.routers)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[HFRouterProbe]:
        return iter(self.probes)

    def __len__(self) -> int:
        return len(self.routers)

    def collect_losses(self, *, calibrate_auto: bool = True) -> CollectedLosses:
        """Weighted routing loss of the last forward (``collect_router_losses`` on the probes)."""
        return collect_router_losses(self.routers, calibrate_auto=calibrate_auto)

    def collect_stats(self, *, reset: bool = True, all_reduce: bool = True) -> list[dict]:
        """Per-layer routing statistics of the window (``collect_routing_stats`` on the probes)."""
        return collect_routing_stats(self.routers, reset=reset, all_reduce=all_reduce)

    def set_token_context(self, context: TokenContext | None) -> None:
        """Per-token sequence/domain ids for the next forward (or ``None`` to clear)."""
        for p in self.probes:
            p.token_context = context

    def train(self, mode: bool = True) -> AttachHandle:
        """Put the probes in training mode (the orthogonality loss is computed only then)."""
        self.routers.train(mode)
        return self

    def detach(self) -> None:
        """Remove every hook and probe reference; restore the experts implementation and the
        model's own aux-loss setting."""
        if not self.attached:
            return
        self._registry.remove_all()
        for p in self.probes:
            if p.block.__dict__.get(ATTACHED_ROUTER_ATTR) is p:
                del p.block.__dict__[ATTACHED_ROUTER_ATTR]
            p.experts.__dict__.pop(X.EXPERTS_PROBE_ATTR, None)
        for config, previous in reversed(self._implementations):
            config._experts_implementation = previous
        self._implementations = []
        if self._aux_state is not None:
            _restore_model_aux_loss(self.model, self._aux_state)
            self._aux_state = None
        self.attached = False

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    model: nn.Module, loss_config: LossConfig, *, model_aux_loss: bool | None = None
) -> AttachHandle:
    """Give every MoE block of a transformers MoE model moespec's losses and statistics.

    The model's own aux loss is switched off while moespec's is weighted (α > 0) unless
    ``model_aux_loss`` says otherwise; ``detach()`` restores it.
    """
    X.register()
    model_type, spec, blocks = moe_blocks(model)
    for _, block in blocks:
        if ATTACHED_ROUTER_ATTR in block.__dict__:
            raise ValueError(
                f"{type(block).__name__} already has moespec attached; detach the first handle"
            )
    probes = [
        HFRouterProbe(block, loss_config, spec, model_type=model_type, layer_index=i, name=name)
        for i, (name, block) in enumerate(blocks)
    ]
    registry = HookRegistry()
    handle = AttachHandle(model, probes, registry)
    for probe in probes:
        config = probe.experts.config
        if all(c is not config for c, _ in handle._implementations):
            handle._implementations.append((config, config._experts_implementation))
        if not getattr(probe.experts, "runs_probe", False):  # expert parallel runs its own
            probe.set_own_implementation(
                X.own_implementation(probe.experts, config._experts_implementation)
            )
    for probe in probes:
        registry.add_forward(_HOOK_GROUP, probe.gate, router_hook(probe))
        object.__setattr__(
            probe.block, ATTACHED_ROUTER_ATTR, probe
        )  # unregistered: not in state_dict
        object.__setattr__(probe.experts, X.EXPERTS_PROBE_ATTR, probe)
    for config, _ in handle._implementations:
        config._experts_implementation = X.IMPLEMENTATION
    handle.train(model.training)
    if model_aux_loss is None:
        model_aux_loss = float(loss_config.aux.weight) == 0
    handle._aux_state = set_model_aux_loss(model, model_aux_loss)
    logger.info(
        "moespec attached to %d %s MoE blocks (%s)",
        len(probes),
        model_type,
        type(blocks[0][1]).__name__,
    )
    return handle


def router_hook(probe: HFRouterProbe):
    """The forward hook that hands a router's output to its probe."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        probe.training = module.training
        probe.observe_router(output)

    return hook


def iter_attached_routers(model: nn.Module) -> list[HFRouterProbe]:
    """The probes attached to ``model``'s MoE blocks, in module order."""
    return [r for r in iter_routers(model) if isinstance(r, HFRouterProbe)]


def collect_losses(model_or_handle: nn.Module | AttachHandle, **kw: Any) -> CollectedLosses:
    """``collect_router_losses`` over the probes attached to a model (or held by a handle)."""
    if isinstance(model_or_handle, AttachHandle):
        return model_or_handle.collect_losses(**kw)
    return collect_router_losses(model_or_handle, **kw)


# ------------------------------------------------------------------ the model's own aux loss


def set_model_aux_loss(model: nn.Module, enabled: bool) -> dict[str, Any]:
    """Switch the model's own load-balancing loss (``config.output_router_logits``).

    Returns the previous settings (for restoring). Logs which aux loss is active.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config; expected a transformers model")
    model_type = model_type_of(model)
    prev = {"output_router_logits": getattr(config, "output_router_logits", None)}
    config.output_router_logits = bool(enabled)
    if not spec_for(model_type).model_aux_loss:
        logger.info(
            "%s adds no aux loss of its own (aux-loss-free balancing); moespec aux loss only",
            model_type,
        )
    elif enabled:
        coef = getattr(config, "router_aux_loss_coef", None)
        logger.info(
            "aux loss: the model's own (router_aux_loss_coef=%s) is active; keep moespec's "
            "aux weight at 0 so it is not counted twice",
            coef,
        )
    else:
        logger.info("aux loss: moespec's is active; the model's own is off")
    return prev


def _restore_model_aux_loss(model: nn.Module, prev: dict[str, Any]) -> None:
    value = prev.get("output_router_logits")
    if value is None:
        with contextlib.suppress(AttributeError):
            delattr(model.config, "output_router_logits")
    else:
        model.config.output_router_logits = value


# ------------------------------------------------------------------------- load and save


def load_hf_model(
    name_or_path: str | os.PathLike | None = None,
    config_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    config_overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A causal LM from a local directory (``from_pretrained``) or a local config (random init).

    ``config_path`` is a ``config.json`` file or a directory holding one; ``config_overrides``
    set keys of the model's config before it is built (each must exist in the config).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (config_path is None):
        raise ValueError(
            f"give exactly one of name_or_path (a model directory) and config_path (a "
            f"config.json); got name_or_path={name_or_path!r}, config_path={config_path!r}"
        )
    if name_or_path is not None:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"model directory {str(path)!r} does not exist or is not a directory; expected "
                f"a local directory written by save_pretrained (or pass config_path=)"
            )
        config = _overridden(AutoConfig.from_pretrained(path), config_overrides)
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    cpath = Path(config_path).expanduser()  # type: ignore[arg-type]
    if cpath.is_dir():
        cpath = cpath / "config.json"
    if not cpath.is_file():
        raise ValueError(
            f"config file {str(cpath)!r} does not exist; expected a config.json file or a "
            f"directory holding one"
        )
    config = _overridden(AutoConfig.from_pretrained(cpath), config_overrides)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


def _overridden(config: Any, overrides: dict[str, Any] | None) -> Any:
    """``config`` with ``overrides`` set; ``ValueError`` naming a key the config does not have."""
    for key, value in (overrides or {}).items():
        if key not in config.to_dict():
            raise ValueError(
                f"model.overrides.{key}: {type(config).__name__} has no key {key!r}; its keys: "
                f"{', '.join(sorted(config.to_dict()))}"
            )
        setattr(config, key, value)
    return config


def save_hf_model(model: nn.Module, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """``save_pretrained`` into ``out_dir``: loads back in plain transformers, moespec not needed."""
    if not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"{type(model).__name__} has no save_pretrained; expected a transformers model"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **kwargs)
    return out


__all__ = [
    "ATTACHED_ROUTER_ATTR",
    "SUPPORTED_MODEL_TYPES",
    "AttachHandle",
    "HFRouterProbe",
    "attach",
    "collect_losses",
    "iter_attached_routers",
    "load_hf_model",
    "model_type_of",
    "moe_blocks",
    "save_hf_model",
    "set_model_aux_loss",
]
