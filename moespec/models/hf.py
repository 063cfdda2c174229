"""moespec routing losses and statistics for transformers v5 MoE models.

:func:`attach` gives every MoE block of a Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral or DeepSeek-V3
model an :class:`HFRouterProbe`: a parameter-free :class:`~moespec.routing.Router` view of the
block's own gate. A forward hook on the gate reads the router logits and the experts the block
selected, and recomputes each token's k raw expert outputs from the block's fused weights for
the orthogonality loss. Nothing is added to the model's modules, parameters or outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import HookRegistry, find_moe_blocks
from ..routing import (
    CollectedLosses,
    LossConfig,
    Router,
    RouterConfig,
    RouterOutput,
    TokenContext,
    collect_router_losses,
    collect_routing_stats,
    iter_routers,
)
from ..routing.router import ATTACHED_ROUTER_ATTR
from .lora import adapted, base_module

logger = logging.getLogger("moespec")

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_SIGMOID_MODEL_TYPES = ("deepseek_v3",)
_NO_MODEL_AUX_LOSS = ("deepseek_v3",)  # aux-loss-free balancing: the model never adds one
PROBE_ATTR = ATTACHED_ROUTER_ATTR  # plain (unregistered) attribute of a block holding its probe
_HOOK_GROUP = "moespec.hf"


def model_type_of(model: nn.Module) -> str:
    """The ``model_type`` of the (text) config of ``model`` (``"?"`` without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return "?"
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return str(getattr(config, "model_type", "?"))


def _gate_of(block: nn.Module) -> nn.Module:
    for attr in ("gate", "router"):
        gate = base_module(getattr(block, attr, None))
        if isinstance(gate, nn.Module) and isinstance(getattr(gate, "weight", None), torch.Tensor):
            return gate
    raise ValueError(
        f"{type(block).__name__} has no router module with a weight; expected 'gate' or 'router'"
    )


def routed_expert_outputs(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Raw (ungated) outputs [T,k,H] of each token's k selected experts from fused weights.

    ``experts`` holds ``gate_up_proj`` [E,2I,H], ``down_proj`` [E,H,I] and ``act_fn``; tokens
    are sorted by expert so each expert runs one matmul over its rows (differentiable).
    """
    t, k = idx.shape
    h = x.shape[-1]
    gate_up, down = experts.gate_up_proj, experts.down_proj
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x.index_select(0, order // k)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        g, u = F.linear(xs[start : start + n], gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(experts.act_fn(g) * u, down[e]))
        start += n
    if not outs:
        return x.new_zeros(t, k, h)
    ys = torch.cat(outs, dim=0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return ys.index_select(0, inverse).view(t, k, h)


class HFRouterProbe(Router):
    """A :class:`Router` reading one transformers MoE block; owns no parameters.

    ``weight`` is the block gate's own weight; the block, gate and experts are held as plain
    attributes so that the probe never becomes part of the model's module tree.
    """

    def __init__(
        self,
        block: nn.Module,
        loss_config: LossConfig,
        *,
        model_type: str,
        layer_index: int | None = None,
        name: str = "",
    ) -> None:
        nn.Module.__init__(self)  # Router.__init__ would create a new gate weight
        gate = _gate_of(block)
        experts = base_module(getattr(block, "experts", None))
        num_experts, hidden = gate.weight.shape
        _check_experts(experts, num_experts, hidden, type(block).__name__)
        sigmoid = model_type in _SIGMOID_MODEL_TYPES
        config = RouterConfig(
            num_experts=int(num_experts),
            top_k=int(gate.top_k),
            score_func="sigmoid" if sigmoid else "softmax",
            normalize_topk=bool(getattr(gate, "norm_topk_prob", True)),
            normalize_top1=True,  # Hugging Face gates renormalise a single weight to 1.0 too
            score_bias=False,  # the block's e_score_correction_bias is left to the model
            loss=loss_config,
        )
        self._init_state(int(hidden), config, layer_index)
        self.name = name
        self.model_type = model_type
        self.track_overlap = True  # the overlap metric costs one extra expert pass in eval
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "experts", experts)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The block gate's weight [E,H] (shared, not copied)."""
        return self.gate.weight

    def observe(
        self, hidden_states: torch.Tensor, gate_output: tuple[torch.Tensor, ...]
    ) -> RouterOutput:
        """Compute the losses and statistics from the gate's input and its output tuple."""
        logits, weights, idx = gate_output[0], gate_output[1], gate_output[2]
        x = hidden_states.reshape(-1, self.hidden_size)
        logits32 = logits.reshape(-1, self.num_experts).float()
        if self.config.score_func == "sigmoid":
            probs = logits32.sigmoid()
            scores = probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)
        else:
            scores = logits32.softmax(-1)
        idx = idx.reshape(-1, self.top_k)
        out = RouterOutput(
            logits=logits32, scores=scores, idx=idx, weights=weights.reshape(-1, self.top_k)
        )
        self._compute_losses(out)
        if self.wants_expert_outputs():
            with adapted(self.block.experts) as experts:  # LoRA on the expert weights
                self.record_expert_outputs(routed_expert_outputs(experts, x, idx))
        elif self.track_stats and self.track_overlap:
            with torch.no_grad(), adapted(self.block.experts) as experts:
                self.record_expert_outputs(routed_expert_outputs(experts, x, idx))
        return out

    def replay(self, hidden_states: torch.Tensor, gate_output: tuple[torch.Tensor, ...]) -> None:
        """Recomputation inside backward (activation checkpointing): redo the same ops so the
        checkpoint sees the same saved tensors, but keep the losses and stats of the forward."""
        kept, track = self.raw_losses, self.track_stats
        self.track_stats = False
        try:
            self.observe(hidden_states, gate_output)
        finally:
            self.raw_losses, self.track_stats = kept, track

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` [T,H] with the block's own gate (no hooks) and record the losses."""
        return self.observe(x, self.gate.forward(x))

    def extra_repr(self) -> str:
        return f"{self.name or self.model_type}: " + super().extra_repr()


def _check_experts(experts: Any, num_experts: int, hidden: int, block_name: str) -> None:
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    ok = (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and callable(getattr(experts, "act_fn", None))
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == num_experts == down.shape[0]
        and gate_up.shape[2] == hidden == down.shape[1]
        and gate_up.shape[1] == 2 * down.shape[2]
    )
    if not ok:
        found = {
            "gate_up_proj": tuple(gate_up.shape) if isinstance(gate_up, torch.Tensor) else None,
            "down_proj": tuple(down.shape) if isinstance(down, torch.Tensor) else None,
        }
        raise ValueError(
            f"{block_name}.experts does not hold fused experts in the expected layout: found "
            f"{found}; expected gate_up_proj [E,2I,H] and down_proj [E,H,I] with "
            f"E={num_experts}, H={hidden}, and an act_fn"
        )


def _check_supported(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    model_type = model_type_of(model)
    blocks = find_moe_blocks(model)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if not blocks:
        raise ValueError(
            f"no MoE blocks found in {type(model).__name__} (model_type {model_type!r}); "
            f"moespec attaches to the MoE blocks of model types: {supported}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        kinds = sorted({type(b).__name__ for _, b in blocks})
        raise ValueError(
            f"model_type {model_type!r} ({type(model).__name__}, blocks {kinds}) is not "
            f"supported; supported model types: {supported}"
        )
    return model_type, blocks


class AttachHandle:
    """The probes attached to one model; ``detach()`` (or leaving a ``with``) removes them."""

    def __init__(self, model: nn.Module, probes: list[HFRouterProbe], registry: HookRegistry):
        self.model = model
        self.routers = nn.ModuleList(probes)  # a container for moespec.routing collectors
        self._registry = registry
        self._aux_state: dict[str, Any] | None = None
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
        """Remove every hook and probe reference and restore the model's own aux-loss setting."""
        if not self.attached:
            return
        self._registry.remove_all()
        for p in self.probes:
            if p.block.__dict__.get(PROBE_ATTR) is p:
                del p.block.__dict__[PROBE_ATTR]
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
    """Give every MoE block of a supported transformers model moespec's losses and statistics.

    The model's own aux loss is switched off while moespec's is weighted (α > 0) unless
    ``model_aux_loss`` says otherwise; ``detach()`` restores it.
    """
    model_type, blocks = _check_supported(model)
    for _, block in blocks:
        if PROBE_ATTR in block.__dict__:
            raise ValueError(
                f"{type(block).__name__} already has moespec attached; detach the first handle"
            )
    probes = [
        HFRouterProbe(block, loss_config, model_type=model_type, layer_index=i, name=name)
        for i, (name, block) in enumerate(blocks)
    ]
    registry = HookRegistry()
    for probe in probes:
        registry.add_forward(_HOOK_GROUP, probe.gate, _make_gate_hook(probe))
        object.__setattr__(probe.block, PROBE_ATTR, probe)  # unregistered: not in state_dict
    handle = AttachHandle(model, probes, registry)
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


def _make_gate_hook(probe: HFRouterProbe):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, tuple) or len(output) < 3:
            raise ValueError(
                f"{type(module).__name__} returned {type(output).__name__}; expected the "
                f"transformers v5 tuple (router_logits, top_k_weights, top_k_index)"
            )
        probe.training = module.training
        if torch._C._current_graph_task_id() == -1:
            probe.observe(args[0], output)
        else:
            probe.replay(args[0], output)

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
    if model_type in _NO_MODEL_AUX_LOSS:
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
    **kwargs: Any,
) -> nn.Module:
    """A causal LM from a local directory (``from_pretrained``) or a local config (random init).

    ``config_path`` is a ``config.json`` file or a directory holding one.
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
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    cpath = Path(config_path).expanduser()  # type: ignore[arg-type]
    if cpath.is_dir():
        cpath = cpath / "config.json"
    if not cpath.is_file():
        raise ValueError(
            f"config file {str(cpath)!r} does not exist; expected a config.json file or a "
            f"directory holding one"
        )
    config = AutoConfig.from_pretrained(cpath)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


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
    "PROBE_ATTR",
    "SUPPORTED_MODEL_TYPES",
    "AttachHandle",
    "HFRouterProbe",
    "attach",
    "collect_losses",
    "iter_attached_routers",
    "load_hf_model",
    "model_type_of",
    "routed_expert_outputs",
    "save_hf_model",
    "set_model_aux_loss",
]
