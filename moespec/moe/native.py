"""Native dropless top-k MoE layer with fused SwiGLU expert weights.

Tokens are sorted by expert and run through grouped matmuls (``torch._grouped_mm`` where
the installed torch has it, else one matmul per expert over contiguous slices). The raw
outputs of each token's k experts, before gating, are handed to the router for the
orthogonality loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import Router, RouterConfig

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (the shared expert)."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class FusedExperts(nn.Module):
    """E SwiGLU experts held as two fused tensors: ``gate_up`` [E,H,2I] and ``down`` [E,I,H]."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ffn_size = ffn_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_size))
        self.down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        nn.init.normal_(self.gate_up, std=hidden_size**-0.5)
        nn.init.normal_(self.down, std=ffn_size**-0.5)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run rows of ``x_sorted`` [N,H], grouped by expert with ``counts`` [E], through them."""
        if _HAS_GROUPED_MM and x_sorted.dtype in (torch.float32, torch.bfloat16):
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x_sorted, self.gate_up.to(x_sorted.dtype), offs=offs)
            g, u = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(g) * u, self.down.to(x_sorted.dtype), offs=offs)
        return self.forward_loop(x_sorted, counts)

    def forward_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One matmul per expert over its contiguous slice (fallback and float64 path)."""
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xs = x_sorted[start : start + n]
            g, u = (xs @ self.gate_up[e].to(xs.dtype)).chunk(2, dim=-1)
            outs.append((F.silu(g) * u) @ self.down[e].to(xs.dtype))
            start += n
        if not outs:
            return x_sorted.new_zeros(0, self.down.shape[-1])
        return torch.cat(outs, dim=0)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to ``x`` [..., H] (plain reference path)."""
        g, u = (x @ self.gate_up[e]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.down[e]


class MoELayer(nn.Module):
    """Dropless top-k MoE: router, fused experts, optional shared expert.

    Input [..., H] → output [..., H]. The router keeps the losses and statistics.
    """

    is_moespec_moe = True

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        router_config: RouterConfig,
        *,
        shared_expert_size: int = 0,
        layer_index: int | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or ffn_size < 1:
            raise ValueError(
                f"hidden_size and ffn_size must be >= 1, got {hidden_size}, {ffn_size}"
            )
        self.hidden_size = hidden_size
        self.router = Router(hidden_size, router_config, layer_index=layer_index)
        self.experts = FusedExperts(router_config.num_experts, hidden_size, ffn_size)
        self.shared_expert = (
            SwiGLU(hidden_size, shared_expert_size) if shared_expert_size > 0 else None
        )

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        t, k = flat.shape[0], self.top_k
        route = self.router(flat)
        slot_expert = route.idx.reshape(-1)  # [T*k], slot s = token s//k, choice s%k
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        x_sorted = flat.index_select(0, order // k)
        y_sorted = self.experts(x_sorted, counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        raw = y_sorted.index_select(0, inverse).view(t, k, shape[-1])  # [T,k,H]
        self.router.record_expert_outputs(raw)
        out = torch.bmm(route.weights.to(raw.dtype).unsqueeze(1), raw).squeeze(1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, ffn={self.experts.ffn_size}, shared={self.shared_expert is not None}"
