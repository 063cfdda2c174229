"""Expert parallelism: 2 ranks with EP=2 give the losses and gradients of one process."""

import subprocess
import sys

import pytest
import torch

from moespec.moe import MoEConfig, build_moe_layer
from moespec.routing import LossConfig, collect_router_losses
from tests.common import ROOT

WORKER = ROOT / "tests" / "workers" / "ep_layer.py"
HIDDEN, FFN, EXPERTS, TOP_K, TOKENS, WORLD = 16, 24, 4, 2, 24, 2


def reference(batch: torch.Tensor) -> dict:
    """One process, native layer, same seed: per-shard outputs/losses, expert grads summed."""
    loss = LossConfig()
    loss.orthogonality.weight = 0.5
    loss.variance.weight = 0.25
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, MoEConfig(num_experts=EXPERTS, top_k=TOP_K, ffn_size=FFN), loss)
    shards = []
    for r in range(WORLD):
        layer.zero_grad()
        x = batch[r].clone().requires_grad_(True)
        y = layer(x)
        task = (y * torch.linspace(-1, 1, HIDDEN)).square().mean()
        routed = collect_router_losses(layer)
        (task + routed.total).backward()
        shards.append(
            {
                "y": y.detach(),
                "losses": {k: v.detach() for k, v in layer.router.raw_losses.items()},
                "router_grad": layer.router.weight.grad.clone(),
                "gate_up": layer.experts.gate_up.grad.clone(),
                "down": layer.experts.down.grad.clone(),
                "x_grad": x.grad,
            }
        )
    return {
        "shards": shards,
        "gate_up": sum(s["gate_up"] for s in shards),
        "down": sum(s["down"] for s in shards),
    }


@pytest.mark.multiproc
def test_ep2_matches_single_process(torchrun2, train_env, tmp_path):
    cmd = [*torchrun2, str(WORKER), str(tmp_path), "2"]
    proc = subprocess.run(cmd, env=train_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = torch.randn(WORLD, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    ref = reference(batch)
    tol = dict(atol=1e-5, rtol=1e-5)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        shard = ref["shards"][r]
        torch.testing.assert_close(got["y"], shard["y"], **tol)
        assert set(got["losses"]) == set(shard["losses"]) == {"aux", "variance", "orthogonality"}
        for name, value in shard["losses"].items():
            torch.testing.assert_close(got["losses"][name], value, **tol, msg=name)
        torch.testing.assert_close(got["router_grad"], shard["router_grad"], **tol)
        torch.testing.assert_close(got["x_grad"], shard["x_grad"], **tol)
        assert got["expert_ids"] == [2 * r, 2 * r + 1]
        for i, e in enumerate(got["expert_ids"]):
            torch.testing.assert_close(got["gate_up_grads"][i], ref["gate_up"][e].T, **tol)
            torch.testing.assert_close(got["down_grads"][i], ref["down"][e].T, **tol)


@pytest.mark.multiproc
def test_skewed_routing_computes_only_the_routed_rows(torchrun2, train_env, tmp_path):
    """Every token of both ranks routes to rank 0's experts: rank 0 computes all routed rows,
    rank 1 none, nothing is padded (a capacity-padded dispatch computes E x max load rows on
    each rank), and the outputs still equal the one-process layer's."""
    sys.path.insert(0, str(WORKER.parent))
    from ep_layer import skew

    cmd = [*torchrun2, str(WORKER), str(tmp_path), "2", "skew"]
    proc = subprocess.run(cmd, env=train_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, ffn_size=FFN)
    layer = build_moe_layer(HIDDEN, moe, LossConfig())
    batch = torch.randn(WORLD, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    batch = skew(layer.router.weight, batch)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    routes = TOKENS * TOP_K
    assert [g["rows_routed"] for g in got] == [routes, routes]
    assert [g["rows_computed"] for g in got] == [WORLD * routes, 0]
    assert [g["dispatch_rows_ratio"] for g in got] == [1.0, 1.0]
    for r in range(WORLD):
        idx = layer.router(batch[r]).idx
        assert set(idx.flatten().tolist()) == {0, 1}  # the skew holds in the reference too
        torch.testing.assert_close(got[r]["y"], layer(batch[r]).detach(), atol=1e-5, rtol=1e-5)


def test_token_dropping_matches_per_token_loop(train_env):
    """capacity_factor < 1 with drop_tokens: outputs, dropped count, L_o and overlap vs a loop."""
    worker = WORKER.parent / "ds_capacity.py"
    proc = subprocess.run(
        [sys.executable, str(worker)], env=train_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok dropped=" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.multiproc
def test_global_aux_scope_equals_whole_batch_loss(torchrun2, train_env, tmp_path):
    """scope=global over 2 ranks: each rank's loss is the whole batch's, and the gradients
    averaged over ranks (what data parallelism applies) are the whole batch's gradient."""
    from moespec.routing import Router, RouterConfig
    from moespec.routing import losses as L

    worker = WORKER.parent / "global_aux.py"
    proc = subprocess.run(
        [*torchrun2, str(worker), str(tmp_path)], env=train_env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    router = Router(12, RouterConfig(num_experts=6, top_k=2))
    batch = torch.randn(2, 20, 12, generator=torch.Generator().manual_seed(1))
    out = router(batch.reshape(-1, 12))
    ref = L.load_balancing_loss(out.scores, out.idx, 6)
    ref.backward()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for g in got:
        torch.testing.assert_close(g["aux"], ref.detach(), rtol=1e-6, atol=1e-7)
    mean_grad = (got[0]["grad"] + got[1]["grad"]) / 2
    torch.testing.assert_close(mean_grad, router.weight.grad, rtol=1e-5, atol=1e-7)
