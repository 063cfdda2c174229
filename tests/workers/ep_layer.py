"""Worker: one rank of an expert-parallel DeepSpeed MoE layer; saves what it computed.

Usage: torchrun --nproc_per_node N tests/workers/ep_layer.py OUT_DIR EP_SIZE [skew]
Every rank builds the same layer from the same seed and runs its own shard of one batch.
With ``skew`` every token of every rank routes to the experts of rank 0 (:func:`skew`).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moespec.moe import MoEConfig, build_moe_layer
from moespec.routing import LossConfig, collect_router_losses
from moespec.train.launch import init_distributed

HIDDEN, FFN, EXPERTS, TOP_K, TOKENS = 16, 24, 4, 2, 24


def skew(router_weight: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Make experts 0 and 1 every token's choice: positive inputs, a gate that favours them."""
    with torch.no_grad():
        router_weight[: EXPERTS // 2] = 1.0
        router_weight[EXPERTS // 2 :] = -1.0
    return batch.abs() + 0.1


def main() -> None:
    out_dir, ep, skewed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["skew"]
    rank, world = init_distributed()
    loss = LossConfig()
    loss.orthogonality.weight = 0.5
    loss.variance.weight = 0.25
    torch.manual_seed(0)
    layer = build_moe_layer(
        HIDDEN,
        MoEConfig(backend="deepspeed", num_experts=EXPERTS, top_k=TOP_K, ffn_size=FFN, ep_size=ep),
        loss,
    )
    layer.train()
    batch = torch.randn(world, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    if skewed:
        batch = skew(layer.router.weight, batch)
    x = batch[rank].clone().requires_grad_(True)
    y = layer(x)
    task = (y * torch.linspace(-1, 1, HIDDEN)).square().mean()
    routed = collect_router_losses(layer)
    (task + routed.total).backward()
    experts = layer.experts.deepspeed_moe.experts.deepspeed_experts
    dispatch = layer.experts.deepspeed_moe
    window = layer.router.stats.window
    window.all_reduce()
    torch.save(
        {
            "y": y.detach(),
            "task": task.detach(),
            "losses": {k: v.detach() for k, v in layer.router.raw_losses.items()},
            "total": routed.total.detach(),
            "router_grad": layer.router.weight.grad,
            "expert_ids": layer.experts.local_expert_ids(),
            "gate_up_grads": [e.gate_up.weight.grad for e in experts],
            "down_grads": [e.down.weight.grad for e in experts],
            "x_grad": x.grad,
            "rows_routed": dispatch.rows_routed,
            "rows_computed": dispatch.rows_computed,
            "dispatch_rows_ratio": float(window.get("dispatch_rows_ratio")),
        },
        out_dir / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
