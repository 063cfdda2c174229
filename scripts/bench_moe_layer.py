"""Forward+backward time of ``moespec.moe.MoELayer`` against other MoE layers and a roofline.

Compared, with identical weights and routing (outputs checked before timing):

* transformers' ``Qwen3MoeSparseMoeBlock`` in each ``experts_implementation`` it offers;
* DeepSpeed's ``deepspeed.moe.layer.MoE`` (``ep_size=1``, no token dropping);
* the roofline: dense ``torch.mm`` calls doing exactly the matmuls of an ideal grouped
  implementation (forward and backward) over the ``T*k`` routed rows.

It also reports the step-time ratio of the router with aux + orthogonality + variance
losses against aux only. Variants are interleaved in rounds and the median is reported.

    python scripts/bench_moe_layer.py [--device cuda] [--tokens 4096] ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import markdown_table, time_fn, write_section  # noqa: E402

from moespec.moe import MoELayer  # noqa: E402
from moespec.routing import LossConfig, RouterConfig, collect_router_losses  # noqa: E402
from moespec.train.launch import free_port  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Variant:
    """One timed step function and the times measured for it (seconds)."""

    name: str
    step: Callable[[], object]
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (the run-to-run noise)."""
        if len(self.times) < 4:
            return (max(self.times) - min(self.times)) / self.median
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return (q[2] - q[0]) / self.median


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median taken)")
    p.add_argument("--loss-rounds", type=int, default=15, help="rounds for the loss overhead")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-gather-gb", type=float, default=4.0, help="skip batched_mm above this")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="adds each row's share of it")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.loss_rounds < 2:
        p.error("--rounds and --loss-rounds must be at least 2 (medians and quartiles of ratios)")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ideal_flops(n_rows: int, hidden: int, ffn: int) -> float:
    """Forward (6·N·H·I) plus backward (twice that) matmul FLOPs over N routed rows."""
    return 18.0 * n_rows * hidden * ffn


# --------------------------------------------------------------------------- layers


def make_moespec(args: argparse.Namespace, *, ortho: float, variance: float) -> MoELayer:
    """MoELayer with the aux loss and the given orthogonality/variance weights."""
    loss = LossConfig()
    loss.orthogonality.weight = ortho
    loss.variance.weight = variance
    cfg = RouterConfig(num_experts=args.experts, top_k=args.top_k, loss=loss)
    torch.manual_seed(args.seed)
    return MoELayer(args.hidden, args.ffn, cfg)


def make_hf_block(ref: MoELayer, args: argparse.Namespace) -> nn.Module:
    """transformers' Qwen3 MoE block holding ``ref``'s weights (v5 fused [E,2I,H]/[E,H,I])."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.ffn,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    cfg._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ref.router.weight)
        block.experts.gate_up_proj.copy_(ref.experts.gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(ref.experts.down.transpose(1, 2))
    return block


def hf_implementations() -> list[str]:
    """The experts implementations transformers registers (plus its eager loop)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS._global_mapping]


class SwiGLUExpert(nn.Module):
    """One SwiGLU expert as DeepSpeed's ``Experts`` expects it (applied to [..., C, H])."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.zeros(hidden, 2 * ffn))
        self.down = nn.Parameter(torch.zeros(ffn, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = (x @ self.gate_up).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.down


def init_single_process_group() -> None:
    """A one-process gloo group, as DeepSpeed's MoE needs torch.distributed."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    port = free_port()
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def make_deepspeed(ref: MoELayer, args: argparse.Namespace) -> nn.Module:
    """DeepSpeed's MoE with ``ref``'s router and experts, ep_size=1, no token dropping."""
    from deepspeed.moe.layer import MoE

    init_single_process_group()
    layer = MoE(
        hidden_size=args.hidden,
        expert=SwiGLUExpert(args.hidden, args.ffn),
        num_experts=args.experts,
        ep_size=1,
        k=args.top_k,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ref.router.weight)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_up.copy_(ref.experts.gate_up[e])
            expert.down.copy_(ref.experts.down[e])
    return layer


# --------------------------------------------------------------------------- steps


def layer_step(
    layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, *, router_losses: bool = False
) -> Callable[[], None]:
    """Forward, ``(out·grad_out).sum()`` (+ the router losses), backward; grads cleared first."""
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        out = layer(xi)
        if isinstance(out, tuple):
            out = out[0]
        loss = (out * grad_out).sum()
        if router_losses:
            loss = loss + collect_router_losses(layer).total
        loss.backward()

    return step


def roofline_step(
    n_rows: int, hidden: int, ffn: int, dtype: torch.dtype, device: torch.device
) -> Callable[[], None]:
    """The six matmuls of an ideal grouped SwiGLU MoE step, as dense ``torch.mm`` calls."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, w1, w2 = r(n_rows, hidden), r(hidden, 2 * ffn), r(ffn, hidden)
    a, gy, dh = r(n_rows, ffn), r(n_rows, hidden), r(n_rows, 2 * ffn)
    h = torch.empty(n_rows, 2 * ffn, dtype=dtype, device=device)
    y = torch.empty(n_rows, hidden, dtype=dtype, device=device)
    dw2, da = torch.empty_like(w2), torch.empty_like(a)
    dw1, dx = torch.empty_like(w1), torch.empty_like(x)

    def step() -> None:
        torch.mm(x, w1, out=h)  # forward: [N,H]@[H,2I]
        torch.mm(a, w2, out=y)  # forward: [N,I]@[I,H]
        torch.mm(a.T, gy, out=dw2)  # backward of the down projection
        torch.mm(gy, w2.T, out=da)
        torch.mm(x.T, dh, out=dw1)  # backward of the gate/up projection
        torch.mm(dh, w1.T, out=dx)

    return step


# --------------------------------------------------------------------------- timing


def run_rounds(variants: list[Variant], rounds: int, warmup: int, device: torch.device) -> None:
    """Time the variants interleaved (A B C A B C ...), one step each per round."""
    for v in variants:
        for _ in range(warmup):
            v.step()
        sync(device)
    for _ in range(rounds):
        for v in variants:
            sync(device)
            v.times.append(time_fn(v.step, warmup=0, repeat=1))


def same_routing_rows(ours: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Tokens [T] whose top-k experts agree between router logits computed in ``x``'s dtype
    (as transformers computes them) and in float32 (as moespec, DeepSpeed and MegaBlocks do).

    In bfloat16 a near-tie between two experts' scores can flip with the rounding of the
    logits, and a flipped expert changes that token's output and input gradient entirely:
    such tokens say nothing about an implementation's arithmetic, so they are left out of
    the comparison (and counted).
    """
    w, k = ours.router.weight, ours.router.top_k
    with torch.no_grad():
        low = F.linear(x, w.to(x.dtype)).float().softmax(-1).topk(k).indices.sort(-1).values
        high = F.linear(x.float(), w.float()).softmax(-1).topk(k).indices.sort(-1).values
    return (low == high).all(-1)


def check_outputs(
    ours: MoELayer,
    others: dict[str, nn.Module],
    x: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    low_precision_router: bool = False,
) -> dict[str, float]:
    """Max relative |Δ| of output and input gradient of each layer against ``ours``; raise if
    off. ``low_precision_router``: the layers compute their router logits in ``x``'s dtype, so
    only the tokens routed alike are compared (:func:`same_routing_rows`; all of them in
    float32 and float64), and more than 10% routed differently is refused."""
    tol = 1e-3 if x.dtype == torch.float32 else (1e-9 if x.dtype == torch.float64 else 2e-2)
    rows = torch.ones(len(x), dtype=torch.bool, device=x.device)
    if low_precision_router:
        rows = same_routing_rows(ours, x)
        if rows.float().mean().item() < 0.9:
            raise AssertionError(f"{(~rows).sum().item()} of {len(rows)} tokens routed differently")

    def run(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.detach().requires_grad_(True)
        out = layer(xi)
        out = out[0] if isinstance(out, tuple) else out
        (out * grad_out).sum().backward()
        layer.zero_grad(set_to_none=True)
        return out.detach().float()[rows], xi.grad.float()[rows]

    ref_out, ref_grad = run(ours)
    scale = ref_out.abs().max().item()
    errs = {}
    for name, layer in others.items():
        out, grad = run(layer)
        err = max(
            (out - ref_out).abs().max().item() / scale,
            (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item(),
        )
        if not err <= tol:
            raise AssertionError(f"{name}: relative max error {err:.2e} > {tol:.0e}")
        errs[name] = err
    return errs


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    dtype = DTYPES[args.dtype]
    notes: list[str] = []

    ours = make_moespec(args, ortho=0.0, variance=0.0).to(device=device, dtype=dtype)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, args.hidden).to(device=device, dtype=dtype)
    grad_out = torch.randn_like(x)
    flipped = int((~same_routing_rows(ours, x)).sum())
    if flipped:
        notes.append(
            f"{flipped} of {args.tokens} tokens have other top-{args.top_k} experts with {args.dtype} "
            "router logits than with float32 ones (near-ties); the checks of transformers' layers, "
            "which route in that dtype, leave them out."
        )

    # transformers: every experts implementation, keep those that run and match.
    hf = make_hf_block(ours, args).to(device=device, dtype=dtype)
    n_rows = args.tokens * args.top_k
    hf_impls = {}
    for impl in hf_implementations():
        gather_gb = n_rows * 3 * args.hidden * args.ffn * x.element_size() / 2**30
        if impl == "batched_mm" and gather_gb > args.max_gather_gb:
            notes.append(
                f"transformers `batched_mm` skipped: it gathers per-row expert weights "
                f"({gather_gb:.0f} GiB here)."
            )
            continue
        hf.experts.config._experts_implementation = impl

        def call(xi: torch.Tensor, impl: str = impl) -> torch.Tensor:
            hf.experts.config._experts_implementation = impl
            return hf(xi.unsqueeze(0)).squeeze(0)

        wrapper = _Wrap(call, hf)
        try:
            check_outputs(ours, {impl: wrapper}, x, grad_out, low_precision_router=True)
        except Exception as exc:  # an implementation that needs other hardware or kernels
            notes.append(f"transformers `{impl}` skipped: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        hf_impls[impl] = wrapper

    ds = None
    if not args.no_deepspeed:
        try:
            os.environ.setdefault(
                "TORCH_EXTENSIONS_DIR",
                str(Path(__file__).resolve().parents[1] / "build/torch_extensions"),
            )
            ds = make_deepspeed(ours, args).to(device=device, dtype=dtype)
            check_outputs(ours, {"deepspeed": ds}, x, grad_out)
        except Exception as exc:
            notes.append(f"DeepSpeed MoE skipped: {type(exc).__name__}: {str(exc)[:160]}")
            ds = None

    mb = None
    if device.type == "cuda":
        try:
            from moespec.moe.megablocks import MegaBlocksMoELayer

            mb = MegaBlocksMoELayer.from_native(ours).to(dtype=dtype)
            check_outputs(ours, {"megablocks": mb}, x, grad_out)
        except Exception as exc:  # needs the gpu extra (megablocks, grouped_gemm)
            notes.append(f"MegaBlocks dMoE skipped: {type(exc).__name__}: {str(exc)[:160]}")
            mb = None
    else:
        notes.append("MegaBlocks dMoE is CUDA only: not measured on CPU.")

    variants = [Variant("moespec MoELayer", layer_step(ours, x, grad_out, router_losses=True))]
    if mb is not None:
        variants.append(
            Variant("moespec on MegaBlocks dMoE", layer_step(mb, x, grad_out, router_losses=True))
        )
    variants += [
        Variant(f"transformers Qwen3MoeSparseMoeBlock ({impl})", layer_step(m, x, grad_out))
        for impl, m in hf_impls.items()
    ]
    if ds is not None:
        variants.append(
            Variant("DeepSpeed MoE (ep_size=1, drop_tokens=False)", layer_step(ds, x, grad_out))
        )
    roof = Variant(
        "roofline: dense torch.mm, same FLOPs",
        roofline_step(n_rows, args.hidden, args.ffn, dtype, device),
    )
    variants.append(roof)
    run_rounds(variants, args.rounds, args.warmup, device)

    # Router-loss overhead: aux + orthogonality + variance vs aux only, paired per round.
    full = make_moespec(args, ortho=0.1, variance=0.1).to(device=device, dtype=dtype)
    full.load_state_dict(ours.state_dict())
    aux_v = Variant("aux only", layer_step(ours, x, grad_out, router_losses=True))
    full_v = Variant("aux+orth+var", layer_step(full, x, grad_out, router_losses=True))
    run_rounds([aux_v, full_v], args.loss_rounds, args.warmup, device)
    ratios = [f / a for f, a in zip(full_v.times, aux_v.times, strict=True)]
    loss_ratio = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4, method="inclusive")

    flops = ideal_flops(n_rows, args.hidden, args.ffn)
    fastest_other = min((v for v in variants[1:-1]), key=lambda v: v.median, default=None)
    rows = []
    for v in variants:
        rows.append(
            [
                v.name,
                f"{v.median * 1e3:.1f}",
                f"±{v.spread * 50:.1f}%",
                f"{roof.median / v.median:.2f}",
                f"{flops / v.median / 1e9:.0f}",
                *(
                    [f"{flops / v.median / 1e12 / args.peak_tflops:.1%}"]
                    if args.peak_tflops
                    else []
                ),
            ]
        )
    header = ["layer (fwd+bwd)", "time (ms)", "noise (IQR/2)", "roofline / time", "GFLOP/s"]
    header += [f"share of {args.peak_tflops:.0f} TFLOP/s"] if args.peak_tflops else []
    table = markdown_table(header, rows)
    loss_table = markdown_table(
        ["router losses", "time (ms)", "ratio to aux only (paired median)"],
        [
            ["aux", f"{aux_v.median * 1e3:.1f}", "1.000"],
            [
                "aux + orthogonality + variance",
                f"{full_v.median * 1e3:.1f}",
                f"{loss_ratio:.3f} (IQR {q[0]:.3f}–{q[2]:.3f})",
            ],
        ],
    )
    setting = (
        f"{args.experts} experts, top-{args.top_k}, hidden {args.hidden}, expert FFN {args.ffn}, "
        f"{args.tokens} tokens, {args.dtype}, device {device.type}; {args.rounds} interleaved rounds "
        f"({args.loss_rounds} for the loss overhead), medians. One step = forward, "
        f"`(out·g).sum()` backward, grads cleared; the moespec step also adds "
        f"`collect_router_losses(layer).total` (aux loss, α=1e-3). Roofline = the six dense matmuls "
        f"of an ideal grouped step over the {n_rows} routed rows ({flops / 1e9:.1f} GFLOP); "
        f"GFLOP/s counts those FLOPs for every row."
    )
    summary = []
    ours_t = variants[0].median
    if fastest_other is not None:
        summary.append(
            f"MoELayer vs fastest other ({fastest_other.name}): "
            f"{fastest_other.median / ours_t:.2f}× its speed."
        )
    summary.append(f"MoELayer reaches {roof.median / ours_t:.2f} of the roofline (target ≥ 0.90).")
    summary.append(
        f"Orthogonality + variance losses add {100 * (loss_ratio - 1):+.1f}% to the step "
        f"(target ≤ +5%)."
    )
    body = "\n\n".join(
        [setting, table, loss_table, " ".join(summary), *(f"Note: {n}" for n in notes)]
    )
    print(body)
    if not args.no_write:
        section = (
            "bench_moe_layer"
            if args.device == "cpu"
            else f"bench_moe_layer ({args.device}, {args.dtype})"
        )
        print(f"\nwritten to {write_section(section, body)}")


class _Wrap(nn.Module):
    """Calls ``fn`` on [T,H] inputs; exposes ``module``'s parameters."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.inner = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


if __name__ == "__main__":
    main()
