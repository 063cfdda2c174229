"""Worker: the tiny model on the native and deepspeed (ep_size=1) backends from one seed.

Usage: python tests/workers/backends_equal.py
Outputs, router losses and the gradients of the shared weights must agree.
"""

import torch

from moespec.models.tiny import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig
from moespec.routing import LossConfig, collect_router_losses, iter_routers
from moespec.train.launch import init_distributed


def build(backend: str) -> TinyMoELM:
    torch.manual_seed(0)
    loss = LossConfig()
    loss.orthogonality.weight = 0.5
    loss.variance.weight = 0.25
    tiny = TinyMoEConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=32)
    moe = MoEConfig(backend=backend, num_experts=4, top_k=2, ffn_size=8, shared_expert_size=8)
    return TinyMoELM(tiny, moe, loss)


def main() -> None:
    init_distributed()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    models = {b: build(b) for b in ("native", "deepspeed")}
    out = {}
    for name, model in models.items():
        model.train()
        o = model(ids, ids)
        routed = collect_router_losses(model)
        (o.loss + routed.total).backward()
        out[name] = o.logits.detach(), routed.total.detach(), iter_routers(model)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["deepspeed"][0], out["native"][0], **tol)
    torch.testing.assert_close(out["deepspeed"][1], out["native"][1], **tol)
    for rn, rd in zip(out["native"][2], out["deepspeed"][2]):
        assert rn.raw_losses.keys() == rd.raw_losses.keys()
        for key, value in rn.raw_losses.items():
            torch.testing.assert_close(rd.raw_losses[key], value, **tol, msg=key)
        torch.testing.assert_close(rd.weight.grad, rn.weight.grad, rtol=1e-5, atol=1e-6)
    native, ds = models["native"], models["deepspeed"]
    for name, p in native.named_parameters():
        if ".mlp.experts." in name:
            continue  # fused [E,H,2I] there, per-expert Linear weights in deepspeed
        torch.testing.assert_close(ds.get_parameter(name).grad, p.grad, rtol=1e-5, atol=1e-6)
    print("ok")


if __name__ == "__main__":
    main()
