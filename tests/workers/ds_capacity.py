"""Worker: DeepSpeed MoE layer with token dropping against a per-token reference loop.

Usage: python tests/workers/ds_capacity.py
A route is kept when fewer than `capacity` earlier tokens (in token order) went to its expert.
"""

import math

import torch
import torch.nn.functional as F

from moespec.moe import MoEConfig, build_moe_layer
from moespec.routing import LossConfig
from moespec.routing import losses as L
from moespec.train.launch import init_distributed

HIDDEN, FFN, EXPERTS, TOP_K, TOKENS, CAPACITY_FACTOR = 16, 24, 4, 2, 40, 0.75


def main() -> None:
    init_distributed()
    loss = LossConfig()
    loss.orthogonality.weight = 0.5
    torch.manual_seed(0)
    moe = MoEConfig(
        backend="deepspeed",
        num_experts=EXPERTS,
        top_k=TOP_K,
        ffn_size=FFN,
        capacity_factor=CAPACITY_FACTOR,
        drop_tokens=True,
    )
    layer = build_moe_layer(HIDDEN, moe, loss)
    layer.train()
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    y = layer(x)

    router = layer.router
    probs = (x @ router.weight.T).softmax(-1)
    capacity = math.ceil(TOKENS * TOP_K / EXPERTS * CAPACITY_FACTOR)
    experts = layer.experts.deepspeed_moe.experts.deepspeed_experts
    taken = [0] * EXPERTS
    ref_out, ref_raw, dropped = torch.zeros_like(x), [], 0
    for t in range(TOKENS):
        top = torch.topk(probs[t], TOP_K)
        w = top.values / top.values.sum()
        row, whole = [], True
        for j, e in enumerate(top.indices.tolist()):
            if taken[e] >= capacity:
                whole, dropped = False, dropped + 1
                continue
            taken[e] += 1
            gate, up = experts[e].gate_up(x[t]).chunk(2)
            out = experts[e].down(F.silu(gate) * up)
            ref_out[t] += w[j] * out
            row.append(out)
        if whole:
            ref_raw.append(torch.stack(row))
    assert dropped > 0, "the capacity must drop some routes for this check"
    assert layer.experts.deepspeed_moe.gate.dropped_routes == dropped
    torch.testing.assert_close(y, ref_out, rtol=1e-5, atol=1e-5)
    want = L.orthogonality_loss(torch.stack(ref_raw))
    torch.testing.assert_close(router.raw_losses["orthogonality"], want, rtol=1e-5, atol=1e-7)
    stats = router.stats
    assert stats.window.count("output_overlap") == len(ref_raw)
    overlap = float(L.output_overlap(torch.stack(ref_raw)))
    assert math.isclose(float(stats.window.get("output_overlap")), overlap, rel_tol=1e-5)
    lost = (TOKENS - len(ref_raw)) / TOKENS  # tokens that lost at least one route
    assert math.isclose(stats.compute()["dropped_tokens"], lost, rel_tol=1e-9)
    print(f"ok dropped={dropped} whole={len(ref_raw)}")


if __name__ == "__main__":
    main()
