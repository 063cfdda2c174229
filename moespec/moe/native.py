"""Native dropless top-k experts: fused SwiGLU weights, tokens sorted by expert.

Shapes: T tokens, E experts, k experts per token, H hidden size, I expert FFN size.

Tokens are sorted by expert and run through grouped matmuls (``torch._grouped_mm`` where
the installed torch has it, else one matmul per expert over contiguous slices); the raw
outputs of each token's k experts [T,k,H] return in token order, before gating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import ExpertOutput, MoEBackend, combine

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _silu_into(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu.out(g, out=out)


class _RoutedSwiGLU(torch.autograd.Function):
    """Gather, SwiGLU experts and return to slot order in one autograd node (CPU).

    One ``mm`` per expert writing into preallocated slices (measured faster on CPU than
    ``torch._grouped_mm``, which CUDA uses): no per-expert ``cat`` and no zero-filled slice
    gradients. The output returns to slot order by a gather whose backward is a gather too,
    SiLU(gate) is kept from the forward and the backward uses the fused SiLU derivative.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        flat: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        order: torch.Tensor,
        counts: list[int],
        k: int,
    ) -> torch.Tensor:
        n, hidden = order.numel(), flat.shape[-1]
        ffn = down.shape[1]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=order.device)
        token = order // k
        xs = flat.index_select(0, token)  # [N,H] rows sorted by expert
        h = flat.new_empty(n, 2 * ffn)
        act = flat.new_empty(n, ffn)  # silu(gate), kept for the backward
        a = flat.new_empty(n, ffn)
        ys = flat.new_empty(n, hidden)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            sl = slice(start, start + c)
            start += c
            torch.mm(xs[sl], gate_up[e], out=h[sl])
            torch.mul(_silu_into(h[sl, :ffn], act[sl]), h[sl, ffn:], out=a[sl])
            torch.mm(a[sl], down[e], out=ys[sl])
        ctx.save_for_backward(xs, h, act, a, gate_up, down, order, inverse)
        ctx.counts = counts
        ctx.token = token
        ctx.num_tokens = flat.shape[0]
        return ys.index_select(0, inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, graw: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        xs, h, act, a, gate_up, down, order, inverse = ctx.saved_tensors
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        n, hidden = xs.shape
        ffn = down.shape[1]
        gy = graw.index_select(0, order)  # output gradient in expert order
        width = max(ctx.counts, default=0)
        da = graw.new_empty(width, ffn)
        dh = graw.new_empty(width, 2 * ffn)
        dxs = graw.new_empty(n, hidden) if need_x else None
        dw1 = torch.empty_like(gate_up) if need_w1 else None
        dw2 = torch.empty_like(down) if need_w2 else None
        start = 0
        for e, c in enumerate(ctx.counts):
            if c == 0:  # an expert without rows gets a zero gradient
                for dw in (dw1, dw2):
                    if dw is not None:
                        dw[e].zero_()
                continue
            sl = slice(start, start + c)
            start += c
            if dw2 is not None:
                torch.mm(a[sl].T, gy[sl], out=dw2[e])
            if not (need_x or need_w1):
                continue
            torch.mm(gy[sl], down[e].T, out=da[:c])
            g, u = h[sl, :ffn], h[sl, ffn:]
            d_up = dh[:c, ffn:]  # first da·up (the SiLU output gradient), then d(up)
            torch.mul(da[:c], u, out=d_up)
            torch.ops.aten.silu_backward.grad_input(d_up, g, grad_input=dh[:c, :ffn])
            torch.mul(da[:c], act[sl], out=d_up)
            if dw1 is not None:
                torch.mm(xs[sl].T, dh[:c], out=dw1[e])
            if dxs is not None:
                torch.mm(dh[:c], gate_up[e].T, out=dxs[sl])
        dflat = None
        if dxs is not None:
            dflat = dxs.new_zeros(ctx.num_tokens, hidden).index_add_(0, ctx.token, dxs)
        return dflat, dw1, dw2, None, None, None


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (the shared expert)."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class FusedExperts(MoEBackend):
    """E SwiGLU experts held as two fused tensors: ``gate_up`` [E,H,2I] and ``down`` [E,I,H].

    The native backend: dropless, every token reaches all k of its experts.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ffn_size = ffn_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_size))
        self.down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        nn.init.normal_(self.gate_up, std=hidden_size**-0.5)
        nn.init.normal_(self.down, std=ffn_size**-0.5)

    def forward(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> ExpertOutput:
        """Each token of ``flat`` [T,H] through its k experts ``idx`` [T,k], gated by ``weights``."""
        t, k = idx.shape
        slot_expert = idx.reshape(-1)  # [T*k], slot s = token s//k, choice s%k
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        raw = self.forward_slots(flat, order, counts, k).view(t, k, flat.shape[-1])  # [T,k,H]
        return ExpertOutput(raw=raw, combined=combine(raw, weights))

    def grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
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

    def forward_slots(
        self, flat: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Raw expert outputs [T*k,H] in slot order for tokens ``flat`` [T,H].

        ``order`` sorts the T*k slots (slot s = token s//k) by expert, ``counts`` [E] are
        the slots per expert.
        """
        gate_up, down = self.gate_up.to(flat.dtype), self.down.to(flat.dtype)
        if flat.device.type == "cpu":
            return _RoutedSwiGLU.apply(flat, gate_up, down, order, counts.tolist(), k)
        y_sorted = self.grouped(flat.index_select(0, order // k), counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _Permute.apply(y_sorted, inverse, order)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to ``x`` [..., H] (plain reference path)."""
        g, u = (x @ self.gate_up[e]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.down[e]


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; backward gathers with its inverse."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        index: torch.Tensor,
        inverse: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
