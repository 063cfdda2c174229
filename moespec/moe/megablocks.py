"""MegaBlocks dropless MoE experts driven by the moespec router (CUDA only).

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

from ..routing import Router, RouterConfig
from .config import MoEConfig
from .native import MoELayer, SwiGLU

_INSTALL_HINT = "pip install 'moespec[gpu]'"


class BackendUnavailableError(RuntimeError):
    """A MoE backend cannot run on this machine (missing accelerator or package)."""


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


class MegaBlocksMoELayer(nn.Module):
    """Dropless top-k MoE on MegaBlocks' grouped GLU experts, routed by a moespec ``Router``.

    Input [..., H] → output [..., H]; same interface and weights as the native ``MoELayer``.
    """

    is_moespec_moe = True

    def __init__(
        self,
        hidden_size: int,
        moe: MoEConfig,
        router_cfg: RouterConfig,
        *,
        layer_index: int | None = None,
    ) -> None:
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
        self.router = Router(hidden_size, router_cfg, layer_index=layer_index)
        e = router_cfg.num_experts
        self.sort_end_bit = max(math.ceil(math.log2(e)), 1)
        self.args = Arguments(
            hidden_size=hidden_size,
            ffn_hidden_size=moe.ffn_size,
            moe_num_experts=e,
            moe_top_k=router_cfg.top_k,
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
        # w1 (gate), v1 (up), w2 (down): each [E*I, H] in MegaBlocks' layout.
        self.experts = GroupedGLU(self.args)
        self.shared_expert = (
            SwiGLU(hidden_size, moe.shared_expert_size) if moe.shared_expert_size > 0 else None
        )
        if self.shared_expert is not None:
            self.shared_expert.to(self.experts.w1.device)
        self.router.to(self.experts.w1.device)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    # ------------------------------------------------------------- weight exchange
    @torch.no_grad()
    def load_native_weights(self, native: MoELayer) -> MegaBlocksMoELayer:
        """Copy router, experts and shared expert from a native ``MoELayer`` (same sizes)."""
        e, h, i = self.num_experts, self.hidden_size, self.ffn_size
        fe = native.experts
        if tuple(fe.gate_up.shape) != (e, h, 2 * i) or tuple(fe.down.shape) != (e, i, h):
            raise ValueError(
                f"native experts gate_up {tuple(fe.gate_up.shape)}, down {tuple(fe.down.shape)} "
                f"do not match this layer: expected ({e}, {h}, {2 * i}) and ({e}, {i}, {h})"
            )
        if (native.shared_expert is None) != (self.shared_expert is None):
            raise ValueError("native and megablocks layers disagree on having a shared expert")
        gate, up = fe.gate_up.chunk(2, dim=-1)  # [E,H,I] each
        w = self.experts
        w.w1.copy_(gate.transpose(1, 2).reshape(e * i, h))
        w.v1.copy_(up.transpose(1, 2).reshape(e * i, h))
        w.w2.copy_(fe.down.reshape(e * i, h))
        self.router.load_state_dict(native.router.state_dict())
        if self.shared_expert is not None:
            self.shared_expert.load_state_dict(native.shared_expert.state_dict())
        return self

    @torch.no_grad()
    def native_expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights in the native layout: ``gate_up`` [E,H,2I] and ``down`` [E,I,H]."""
        e, h, i = self.num_experts, self.hidden_size, self.ffn_size
        w = self.experts
        gate = w.w1.view(e, i, h).transpose(1, 2)
        up = w.v1.view(e, i, h).transpose(1, 2)
        return torch.cat([gate, up], dim=-1).contiguous(), w.w2.view(e, i, h).clone()

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

    # ---------------------------------------------------------------------- forward
    def _experts_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Grouped SwiGLU over rows sorted by expert; grouped_gemm in bf16, else per expert."""
        e, h, i = self.num_experts, self.hidden_size, self.ffn_size
        w = self.experts
        if x_sorted.dtype == torch.bfloat16:
            if w.w1.dtype == torch.bfloat16:
                return w(x_sorted, counts)  # GroupedGLU.forward
            from megablocks.grouped_gemm_util import ops as gg_ops

            sizes = counts.cpu().to(torch.long)
            w1, v1, w2 = (p.view(e, i, h).to(torch.bfloat16) for p in (w.w1, w.v1, w.w2))
            g = gg_ops.gmm(x_sorted, w1, sizes, trans_b=True)
            u = gg_ops.gmm(x_sorted, v1, sizes, trans_b=True)
            return gg_ops.gmm(F.silu(g) * u, w2, sizes)
        w1, v1, w2 = (p.view(e, i, h).to(x_sorted.dtype) for p in (w.w1, w.v1, w.w2))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self._ops
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        t, k = flat.shape[0], self.top_k
        route = self.router(flat)
        if t == 0:
            raw = flat.new_zeros(0, k, shape[-1])
            self.router.record_expert_outputs(raw)
            return x.clone()
        slot_expert = route.idx.reshape(-1).int()  # [T*k], slot s = token s//k
        with torch.no_grad():
            bin_ids, indices = ops.sort(slot_expert, self.sort_end_bit)
            counts = ops.histogram(slot_expert, self.num_experts)
            bins = ops.inclusive_cumsum(counts, 0)
            bins = bins.view(1) if bins.dim() == 0 else bins
        flat_c = flat.contiguous()
        x_sorted = ops.gather(flat_c, indices, bin_ids, bins, k)
        y_sorted = self._experts_forward(x_sorted, counts)
        # top_k=1 on T*k slots un-permutes row by row without summing: raw [T*k,H].
        raw = ops.scatter(y_sorted.contiguous(), indices, bin_ids, None, bins, 1)
        raw = raw.view(t, k, shape[-1])
        self.router.record_expert_outputs(raw)
        out = torch.bmm(route.weights.to(raw.dtype).unsqueeze(1), raw).squeeze(1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, ffn={self.ffn_size}, "
            f"shared={self.shared_expert is not None}, impl=megablocks-grouped"
        )


__all__ = ["BackendUnavailableError", "MegaBlocksMoELayer", "megablocks_missing"]
