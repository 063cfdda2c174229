"""DeepSpeed AutoEP for transformers MoE families that DeepSpeed has a preset for.

``moe.backend=autoep``: moespec writes the ``expert_parallel`` section of the DeepSpeed config
(:func:`autoep_section`) and ``deepspeed.initialize`` replaces each MoE block with an
``AutoEPMoELayer`` (dropless top-k dispatch with uneven all-to-all, grouped-GEMM experts).
:func:`attach_autoep` then gives each converted layer a router probe: the router's logits
from its gate, the experts each token chose and their weights from AutoEP's router, and each
token's k raw expert outputs on its home rank from the same expert pass (read where AutoEP
combines them, before the gate weights are applied), so moespec's losses and statistics need
no second pass.

The compatibility with the transformers moespec installs lives here too
(:func:`install_compat`), guarded by the signature it repairs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..hooks import HookRegistry
from ..routing import LossConfig, RouterConfig
from ..routing.router import ATTACHED_ROUTER_ATTR
from .hf import AttachHandle, router_hook, set_model_aux_loss
from .probe import HFRouterProbe
from .specs import DEFAULT_SPEC

logger = logging.getLogger(__name__)

_HOOK_GROUP = "moespec-autoep"
_MISSING = object()


def registry_shim_needed() -> bool:
    """Whether transformers' output-capture registry takes ``get(model)`` only, where AutoEP
    (DeepSpeed 0.19.8) calls ``get(key, default)`` with the class-name keys it stores."""
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CanRecordRegistry", None)
    if registry is None or getattr(registry.get, "moespec_shim", False):
        return False
    return len(inspect.signature(registry.get).parameters) < 3


def install_compat() -> None:
    """Let AutoEP read transformers' output-capture registry (a no-op where not needed)."""
    if not registry_shim_needed():
        return
    from transformers.utils import output_capturing

    registry = output_capturing._CanRecordRegistry
    by_model = registry.get

    def get(self: dict, key: Any, default: Any = _MISSING) -> Any:
        if isinstance(key, str):  # AutoEP: a plain dict lookup by class name
            return dict.get(self, key, None if default is _MISSING else default)
        return by_model(self, key)

    get.moespec_shim = True  # type: ignore[attr-defined]
    registry.get = get


#: The families whose AutoEP conversion equals the unconverted model (logits, every routing
#: loss, gradients, experts gathered back) at EP=1 and EP=2: ``tests/workers/autoep_check.py``.
VERIFIED = (
    "deepseek_v3", "minimax_m3_vl_text", "mixtral", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe",
)  # fmt: skip
#: Families with a DeepSpeed preset whose conversion differs from the model, and why.
DIFFERS = {"deepseek_v2": "its logits differ from the model's by up to 5e-3 (routing rule)"}


def preset_for(model_type: str) -> str | None:
    """The DeepSpeed AutoEP preset of a transformers ``model_type``, if it has one."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    for name, preset in PRESET_MODELS.items():
        if model_type in preset.hf_model_types:
            return name
    return None


def check_family(model_type: str) -> None:
    """``ValueError`` (one line, what works instead) unless AutoEP runs ``model_type`` exactly."""
    if model_type in VERIFIED:
        return
    if preset_for(model_type) is None:
        why = "DeepSpeed AutoEP has no preset for it"
    else:
        why = DIFFERS.get(model_type, "its AutoEP conversion is not verified against the model")
    raise ValueError(
        f"moe.backend=autoep with model_type {model_type!r}: {why}; AutoEP runs "
        f"{', '.join(VERIFIED)} exactly; use moe.backend=deepspeed (every family)"
    )


def autoep_section(model_type: str, ep_size: int, *, verified: bool = True) -> dict[str, Any]:
    """The ``expert_parallel`` section of the DeepSpeed config (:func:`check_family` first,
    unless ``verified=False``: any family with a preset, to check it). Scores are applied after
    the experts (the raw outputs the losses read), combined by the plain weighted sum."""
    if verified:
        check_family(model_type)
    elif preset_for(model_type) is None:
        raise ValueError(f"DeepSpeed AutoEP has no preset for model_type {model_type!r}")
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "preset_model": preset_for(model_type),
        "score_apply": "post",
        "combine_impl": "weighted_sum",
    }


class _PrefixedPatternNote(logging.Filter):
    """Drops DeepSpeed's warning that ``moe_layer_pattern`` overrides the preset's: moespec sets
    it on purpose (its model wrapper prefixes the module names with ``model.``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom preset fields ['moe_layer_pattern']" not in record.getMessage()


@contextlib.contextmanager
def prefixed_pattern_quiet() -> Iterator[None]:
    """Meanwhile, DeepSpeed does not warn about the ``moe_layer_pattern`` moespec sets."""
    from deepspeed.utils import logger as ds_logger

    note = _PrefixedPatternNote()
    ds_logger.addFilter(note)
    try:
        yield
    finally:
        ds_logger.removeFilter(note)


def autoep_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``AutoEPMoELayer`` modules of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "_is_autoep_layer", False)]


class AutoEPRouterProbe(HFRouterProbe):
    """A :class:`~moespec.routing.Router` view of one ``AutoEPMoELayer``; owns no parameters."""

    def __init__(
        self, layer: nn.Module, loss_config: LossConfig, *, model_type: str, index: int, name: str
    ) -> None:
        nn.Module.__init__(self)
        router = layer.router
        config = RouterConfig(
            num_experts=int(layer.num_experts),
            top_k=int(layer.top_k),
            score_func=router.score_func,
            normalize_topk=bool(router.route_norm),
            normalize_top1=True,
            score_bias=False,  # a correction bias is the model's own
            loss=loss_config,
        )
        self._init_state(int(layer.hidden_size), config, index)
        self.name, self.model_type, self.spec = name, model_type, DEFAULT_SPEC
        self.track_overlap = True
        self._logits: torch.Tensor | None = None
        self._choice: tuple[torch.Tensor, torch.Tensor] | None = None
        for attr, value in (("block", layer), ("gate", router.gate), ("experts", layer.experts)):
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "own_forward", None)

    def observe_routes(self, output: tuple) -> None:
        """AutoEP's router output: ``(top_scores [T,k], selected_experts [T,k], counts)``."""
        self._choice = (output[1], output[0])

    def observe_combine(self, expert_output: torch.Tensor, token_order: torch.Tensor) -> None:
        """The expert rows of this forward at their home rank, in ``token_order`` (flat
        token x slot positions), before the gate weights: the losses and statistics."""
        if self._choice is None:
            raise RuntimeError(f"{self.name}: AutoEP combined before its router ran")
        (idx, weights), self._choice = self._choice, None
        raw = None
        if self.needs_expert_outputs():
            t, k = idx.shape
            raw = expert_output.new_zeros(t * k, expert_output.shape[-1])
            raw = raw.index_copy(0, token_order, expert_output).view(t, k, -1)
        self.observe_choice(idx, weights, raw)


class _CombineTap:
    """Wraps AutoEP's ``combine_from_routed`` so the layer whose router ran last gets the raw
    expert rows it combines (one layer runs at a time, router before combine)."""

    def __init__(self) -> None:
        self.probe: AutoEPRouterProbe | None = None
        self.original: Any = None

    def install(self) -> None:
        from deepspeed.module_inject import auto_ep_layer

        if self.original is not None:
            return
        self.original = auto_ep_layer.combine_from_routed
        auto_ep_layer.combine_from_routed = self.combine

    def combine(self, expert_output: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = self.original(expert_output, **kw)
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.observe_combine(expert_output, kw["token_indices_sorted"])
        return out


_TAP = _CombineTap()


def attach_autoep(model: nn.Module, loss_config: LossConfig, model_type: str) -> AttachHandle:
    """Give every ``AutoEPMoELayer`` of ``model`` moespec's losses and statistics."""
    layers = autoep_layers(model)
    if not layers:
        raise ValueError(f"no AutoEP layers in {type(model).__name__}: was AutoEP enabled?")
    for name, layer in layers:
        if layer.score_apply != "post" or layer.combine_impl != "weighted_sum":
            raise ValueError(
                f"{name}: AutoEP applies scores {layer.score_apply!r} with {layer.combine_impl!r}; "
                "moespec reads raw expert outputs: score_apply=post, combine_impl=weighted_sum"
            )
    _TAP.install()
    probes = [
        AutoEPRouterProbe(layer, loss_config, model_type=model_type, index=i, name=name)
        for i, (name, layer) in enumerate(layers)
    ]
    registry = HookRegistry()
    for probe in probes:
        registry.add_forward(_HOOK_GROUP, probe.gate, router_hook(probe))
        registry.add_forward(_HOOK_GROUP, probe.block.router, _router_hook(probe))
        object.__setattr__(probe.block, ATTACHED_ROUTER_ATTR, probe)
    handle = AttachHandle(model, probes, registry)
    handle.train(model.training)
    handle._aux_state = set_model_aux_loss(model, float(loss_config.aux.weight) == 0)
    logger.info("moespec attached to %d AutoEP layers (%s)", len(probes), model_type)
    return handle


def _router_hook(probe: AutoEPRouterProbe):
    def hook(module: nn.Module, args: tuple, output: tuple) -> None:
        probe.observe_routes(output)
        _TAP.probe = probe

    return hook


@torch.no_grad()
def gather_experts(layer: nn.Module) -> dict[str, torch.Tensor]:
    """All E experts of an AutoEP layer as transformers' fused layout names them:
    ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]."""
    parts = [layer.experts.w1, layer.experts.w3, layer.experts.w2]
    if layer.ep_size > 1:
        gathered = []
        for w in parts:
            out = [torch.empty_like(w) for _ in range(layer.ep_size)]
            dist.all_gather(out, w.detach().contiguous(), group=layer.ep_group)
            gathered.append(torch.cat(out))
        parts = gathered
    w1, w3, w2 = (p.detach().cpu() for p in parts)
    return {"gate_up_proj": torch.cat([w1, w3], dim=1).contiguous(), "down_proj": w2.contiguous()}


def hf_state(layer: nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    """An AutoEP layer's weights under the names of the transformers block it replaced
    (collective under expert parallelism: the experts are gathered)."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    preset = PRESET_MODELS[preset_for(model_type)]
    router = layer.router
    state = {f"{preset.router_pattern}.{k}": v for k, v in router.gate.state_dict().items()}
    bias = getattr(router, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor):
        state[f"{preset.router_pattern}.e_score_correction_bias"] = bias
    state.update({f"{preset.experts_pattern}.{k}": v for k, v in gather_experts(layer).items()})
    for attr, name in (
        ("shared_experts", preset.shared_experts_pattern),
        ("shared_experts_gate", preset.shared_experts_gate_pattern),
    ):
        module = getattr(layer, attr, None)
        if module is not None:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


__all__ = [
    "AutoEPRouterProbe",
    "attach_autoep",
    "autoep_layers",
    "autoep_section",
    "check_family",
    "gather_experts",
    "hf_state",
    "install_compat",
    "prefixed_pattern_quiet",
    "preset_for",
    "registry_shim_needed",
]
