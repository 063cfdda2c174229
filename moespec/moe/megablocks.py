"""MegaBlocks dropless MoE backend (CUDA only).

Shapes: T tokens, E experts, k experts per token, H hidden size, I expert FFN size.

Tokens are permuted with MegaBlocks' sort/histogram/gather kernels, run through MegaBlocks'
grouped SwiGLU experts (``megablocks.layers.glu.GroupedGLU``, grouped GEMMs from the
``grouped_gemm`` package), and un-permuted per slot so the router sees each token's raw
expert outputs [T,k,H] before gating. ``grouped_gemm`` computes in bfloat16 only; other
dtypes run the same permutation with one matmul per expert on the same weights.

Nothing here imports megablocks at module import time: the constructor does, and refuses
at once with :class:`BackendUnavailableError` where CUDA or the packages are missing.
"""

from __future__ import annotations

import importlib.util
import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import RouterConfig
from .backend import BackendUnavailableError, ExpertOutput, MoEBackend, combine
from .config import MoEConfig
from .layer import MoELayer

_INSTALL_HINT = "pip install 'moespec[gpu]'"


def megablocks_missing() -> list[str]:
    """What ``moe.backend=megablocks`` lacks here: any of CUDA, megablocks, grouped_gemm."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("megablocks") is None:
        missing.append("the megablocks package")
    if importlib.util.find_spec("grouped_gemm") is None:
        missing.append("the grouped_gemm package (MegaBlocks' grouped GEMMs)")
    return missing


def _require_megablocks() -> None:
    missing = megablocks_missing()
    if missing:
        raise BackendUnavailableError(
            "moe.backend=megablocks needs a CUDA GPU and the `gpu` extra "
            f"({_INSTALL_HINT}, plus grouped_gemm); missing: {', '.join(missing)}. "
            "Valid backends without them: native, deepspeed."
        )


class MegaBlocksExperts(MoEBackend):
    """The ``megablocks`` backend: dropless top-k on MegaBlocks' grouped GLU experts.

    ``glu`` holds w1 (gate), v1 (up), w2 (down), each [E*I, H] in MegaBlocks' layout.
    """

    # Before the router moved to MoELayer the GroupedGLU was the layer's ``experts`` itself.
    legacy_prefixes = {f"experts.{w}": f"experts.glu.{w}" for w in ("w1", "v1", "w2")}

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        _require_megablocks()
        if hidden_size < 1 or moe.ffn_size < 1:
            raise ValueError(
                f"hidden_size and moe.ffn_size must be >= 1, got {hidden_size}, {moe.ffn_size}"
            )
        if moe.ep_size != 1:
            raise ValueError(
                f"moe.backend=megablocks runs all experts on every rank (moe.ep_size=1), got "
                f"moe.ep_size={moe.ep_size}; use moe.backend=deepspeed for expert parallelism"
            )
        import megablocks.ops as mb_ops
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.glu import GroupedGLU

        self._ops = mb_ops
        self.hidden_size = hidden_size
        self.ffn_size = moe.ffn_size
        self.num_experts = e = moe.num_experts
        self.sort_end_bit = max(math.ceil(math.log2(e)), 1)
        self.args = Arguments(
            hidden_size=hidden_size,
            ffn_hidden_size=moe.ffn_size,
            moe_num_experts=e,
            moe_top_k=moe.top_k,
            bias=False,
            activation_fn=F.silu,
            mlp_type="glu",
            mlp_impl="grouped",
            fp16=False,
            bf16=False,
            device=torch.cuda.current_device(),
            init_method=partial(nn.init.normal_, mean=0.0, std=hidden_size**-0.5),
            output_layer_init_method=partial(nn.init.normal_, mean=0.0, std=moe.ffn_size**-0.5),
        )
        self.glu = GroupedGLU(self.args)

    @property
    def w1(self) -> nn.Parameter:
        return self.glu.w1

    @property
    def v1(self) -> nn.Parameter:
        return self.glu.v1

    @property
    def w2(self) -> nn.Parameter:
        return self.glu.w2

    @torch.no_grad()
    def load_fused(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy expert weights in the native layout: ``gate_up`` [E,H,2I], ``down`` [E,I,H]."""
        e, h, i = self.num_experts, self.hidden_size, self.ffn_size
        if tuple(gate_up.shape) != (e, h, 2 * i) or tuple(down.shape) != (e, i, h):
            raise ValueError(
                f"native experts gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)} "
                f"do not match this layer: expected ({e}, {h}, {2 * i}) and ({e}, {i}, {h})"
            )
        gate, up = gate_up.chunk(2, dim=-1)  # [E,H,I] each
        self.w1.copy_(gate.transpose(1, 2).reshape(e * i, h))
        self.v1.copy_(up.transpose(1, 2).reshape(e * i, h))
        self.w2.copy_(down.reshape(e * i, h))

    @torch.no_grad()
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights in the native layout: ``gate_up`` [E,H,2I] and ``down`` [E,I,H]."""
        e, h, i = self.num_experts, self.hidden_size, self.ffn_size
        gate = self.w1.view(e, i, h).transpose(1, 2)
        up = self.v1.view(e, i, h).transpose(1, 2)
        return torch.cat([gate, up], dim=-1).contiguous(), self.w2.view(e, i, h).clone()

    def _experts_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Grouped SwiGLU over rows sorted by expert; grouped_gemm in bf16, else per expert."""
        e, h, i = self.num_experts, self.hidden_size, self.ffn_size
        if x_sorted.dtype == torch.bfloat16:
            if self.w1.dtype == torch.bfloat16:
                return self.glu(x_sorted, counts)  # GroupedGLU.forward
            from megablocks.grouped_gemm_util import ops as gg_ops

            sizes = counts.cpu().to(torch.long)
            w1, v1, w2 = (p.view(e, i, h).to(torch.bfloat16) for p in (self.w1, self.v1, self.w2))
            g = gg_ops.gmm(x_sorted, w1, sizes, trans_b=True)
            u = gg_ops.gmm(x_sorted, v1, sizes, trans_b=True)
            return gg_ops.gmm(F.silu(g) * u, w2, sizes)
        w1, v1, w2 = (p.view(e, i, h).to(x_sorted.dtype) for p in (self.w1, self.v1, self.w2))
        outs = []
        start = 0
        for ex, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xs = x_sorted[start : start + n]
            outs.append((F.silu(xs @ w1[ex].t()) * (xs @ v1[ex].t())) @ w2[ex])
            start += n
        if not outs:
            return x_sorted.new_zeros(0, h)
        return torch.cat(outs, dim=0)

    def forward(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> ExpertOutput:
        ops = self._ops
        t, k = idx.shape
        if t == 0:
            return ExpertOutput(raw=flat.new_zeros(0, k, flat.shape[-1]), combined=flat.clone())
        slot_expert = idx.reshape(-1).int()  # [T*k], slot s = token s//k
        with torch.no_grad():
            bin_ids, indices = ops.sort(slot_expert, self.sort_end_bit)
            counts = ops.histogram(slot_expert, self.num_experts)
            bins = ops.inclusive_cumsum(counts, 0)
            bins = bins.view(1) if bins.dim() == 0 else bins
        x_sorted = ops.gather(flat.contiguous(), indices, bin_ids, bins, k)
        y_sorted = self._experts_forward(x_sorted, counts)
        # top_k=1 on T*k slots un-permutes row by row without summing: raw [T*k,H].
        raw = ops.scatter(y_sorted.contiguous(), indices, bin_ids, None, bins, 1)
        raw = raw.view(t, k, flat.shape[-1])
        return ExpertOutput(raw=raw, combined=combine(raw, weights))

    def extra_repr(self) -> str:
        return "impl=megablocks-grouped"


class MegaBlocksMoELayer(MoELayer):
    """A :class:`MoELayer` on the megablocks backend, with weight exchange to a native one."""

    def __init__(
        self,
        hidden_size: int,
        moe: MoEConfig,
        router_cfg: RouterConfig,
        *,
        layer_index: int | None = None,
    ) -> None:
        _require_megablocks()  # before any weight is drawn
        super().__init__(
            hidden_size,
            moe.ffn_size,
            router_cfg,
            shared_expert_size=moe.shared_expert_size,
            layer_index=layer_index,
            backend="megablocks",
            ep_size=moe.ep_size,
        )

    @torch.no_grad()
    def load_native_weights(self, native: MoELayer) -> MegaBlocksMoELayer:
        """Copy router, experts and shared expert from a native ``MoELayer`` (same sizes)."""
        if (native.shared_expert is None) != (self.shared_expert is None):
            raise ValueError("native and megablocks layers disagree on having a shared expert")
        self.experts.load_fused(native.experts.gate_up, native.experts.down)
        self.router.load_state_dict(native.router.state_dict())
        if self.shared_expert is not None:
            self.shared_expert.load_state_dict(native.shared_expert.state_dict())
        return self

    def native_expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights in the native layout: ``gate_up`` [E,H,2I] and ``down`` [E,I,H]."""
        return self.experts.fused_weights()

    @torch.no_grad()
    def store_native_weights(self, native: MoELayer) -> MoELayer:
        """Copy this layer's weights into a native ``MoELayer`` of the same sizes."""
        gate_up, down = self.native_expert_weights()
        native.experts.gate_up.copy_(gate_up)
        native.experts.down.copy_(down)
        native.router.load_state_dict(self.router.state_dict())
        if self.shared_expert is not None and native.shared_expert is not None:
            native.shared_expert.load_state_dict(self.shared_expert.state_dict())
        return native

    @classmethod
    def from_native(cls, layer: MoELayer, **overrides: Any) -> MegaBlocksMoELayer:
        """A MegaBlocks layer with the sizes, router config and weights of a native layer."""
        shared = layer.shared_expert.down.in_features if layer.shared_expert is not None else 0
        cfg = layer.router.config
        moe = MoEConfig(
            backend="megablocks",
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            ffn_size=layer.experts.ffn_size,
            shared_expert_size=shared,
            score_func=cfg.score_func,
            normalize_topk=cfg.normalize_topk,
            jitter=cfg.jitter,
            score_bias=cfg.score_bias,
            **overrides,
        )
        out = cls(layer.hidden_size, moe, cfg, layer_index=layer.router.layer_index)
        dev = layer.experts.gate_up.device
        if dev.type == "cuda":
            out.to(dev)
        return out.load_native_weights(layer)


__all__ = [
    "BackendUnavailableError",
    "MegaBlocksExperts",
    "MegaBlocksMoELayer",
    "megablocks_missing",
]
