"""MoE backends from the registry: one layer class, same model per seed, old checkpoints load."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moespec.models.tiny import TinyMoEConfig, TinyMoELM
from moespec.moe import (
    BACKENDS,
    ExpertOutput,
    FusedExperts,
    MoEBackend,
    MoEConfig,
    MoELayer,
    backend_names,
    build_moe_layer,
    register_backend,
)
from moespec.moe import backend as backend_mod
from moespec.routing import LossConfig, RouterConfig, iter_routers
from tests.common import ROOT

WORKER = ROOT / "tests" / "workers" / "backends_equal.py"
TINY = TinyMoEConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=32)

# Sums (float64) of the MoE weights the layout before the backend registry drew for
# TINY with seed 0, E=4, k=2, I=8, shared expert of 8: router, all E experts, shared expert.
OLD_LAYOUT_SUMS = {
    0: (
        0.41757465386763215,
        -11.3939794695616,
        2.400411472073756,
        3.06338107585907,
        -0.5019609364680946,
    ),
    1: (
        -2.999948779004626,
        -14.314725897071185,
        9.279383735120064,
        1.780800461769104,
        1.668814706907142,
    ),
}


def _tiny(backend: str, seed: int = 0, **moe: object) -> TinyMoELM:
    torch.manual_seed(seed)
    loss = LossConfig()
    loss.orthogonality.weight = 0.5
    cfg = MoEConfig(backend=backend, num_experts=4, top_k=2, ffn_size=8, **moe)
    return TinyMoELM(TinyMoEConfig(**vars(TINY)), cfg, loss)


def _fused(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of ``layer`` as native ``gate_up`` [E,H,2I] and ``down`` [E,I,H]."""
    if isinstance(layer.experts, FusedExperts):
        return layer.experts.gate_up.detach(), layer.experts.down.detach()
    ds = layer.experts.deepspeed_moe.experts.deepspeed_experts
    gate_up = torch.stack([x.gate_up.weight.detach().T for x in ds])
    return gate_up, torch.stack([x.down.weight.detach().T for x in ds])


@pytest.fixture(scope="module")
def ds_ready():
    pytest.importorskip("deepspeed")


def test_registry_lists_the_backends_and_refuses_unknown_names():
    assert BACKENDS == backend_names()[:3] == ("native", "deepspeed", "megablocks")
    msg = r"moe.backend='x'; valid: native, deepspeed, megablocks"
    with pytest.raises(ValueError, match=msg):
        MoEConfig(backend="x").validate()
    with pytest.raises(ValueError, match=msg):
        MoELayer(8, 8, RouterConfig(num_experts=4, top_k=2), backend="x")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("native")(lambda hidden, moe: FusedExperts(4, hidden, 8))


def test_a_registered_backend_runs_under_the_shared_router():
    class Doubled(MoEBackend):
        def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
            super().__init__()
            self.inner = FusedExperts(moe.num_experts, hidden_size, moe.ffn_size)

        def forward(self, flat, idx, weights) -> ExpertOutput:
            out = self.inner(flat, idx, weights)
            return ExpertOutput(raw=2 * out.raw, combined=2 * out.combined)

    register_backend("doubled")(Doubled)
    try:
        moe = MoEConfig(backend="doubled", num_experts=4, top_k=2, ffn_size=8)
        torch.manual_seed(0)
        layer = build_moe_layer(16, moe, LossConfig())
        torch.manual_seed(0)
        native = build_moe_layer(16, MoEConfig(num_experts=4, top_k=2, ffn_size=8), LossConfig())
        native.experts.load_state_dict(layer.experts.inner.state_dict())
        x = torch.randn(10, 16)
        torch.testing.assert_close(layer(x), 2 * native(x))
        assert layer.router.raw_losses.keys() == native.router.raw_losses.keys()
    finally:
        backend_mod._REGISTRY.pop("doubled")


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_seed_draws_the_weights_of_the_old_layout(backend, ds_ready):
    model = _tiny(backend, shared_expert_size=8)
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        gate_up, down = _fused(mlp)
        got = (
            mlp.router.weight,
            gate_up,
            down,
            mlp.shared_expert.gate_up.weight,
            mlp.shared_expert.down.weight,
        )
        for value, want in zip(got, OLD_LAYOUT_SUMS[i]):
            assert float(value.detach().double().sum()) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_native_and_deepspeed_build_the_same_model(train_env):
    """Same seed: equal router and expert weights; equal outputs, losses and gradients."""
    pytest.importorskip("deepspeed")
    for a, b in zip(_tiny("native").layers, _tiny("deepspeed").layers):
        assert type(b.mlp) is MoELayer
        assert torch.equal(a.mlp.router.weight, b.mlp.router.weight)
        for x, y in zip(_fused(a.mlp), _fused(b.mlp)):
            assert torch.equal(x, y)
    proc = subprocess.run(  # train_env: no launcher variables, so the worker picks its own port
        [sys.executable, str(WORKER)], env=train_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_each_parameter_and_router_appears_once(ds_ready):
    from deepspeed.moe.layer import MoE

    model = _tiny("deepspeed", shared_expert_size=8)
    params = list(model.named_parameters())
    assert len(params) == len({id(p) for _, p in model.named_parameters(remove_duplicate=False)})
    assert len(iter_routers(model)) == TINY.num_layers
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    assert [n for n, _ in found] == ["layers.0.mlp.experts", "layers.1.mlp.experts"]
    for _, m in found:  # DeepSpeed saves every key of its MoE modules as an expert's
        assert all(".deepspeed_experts." in f".{k}" for k in m.state_dict()), list(m.state_dict())


def _old_deepspeed_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the key names of the layout before the registry (router in the gate)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".mlp.router.", ".mlp.deepspeed_moe.gate.router.")
        out[key.replace(".mlp.experts.deepspeed_moe.", ".mlp.deepspeed_moe.")] = value
    return out


def test_native_state_dict_keys_are_unchanged():
    keys = [k for k in _tiny("native", shared_expert_size=8).state_dict() if ".mlp." in k]
    assert [k for k in keys if "router" not in k] == [
        f"layers.{i}.mlp.{name}"
        for i in range(2)
        for name in (
            "experts.gate_up",
            "experts.down",
            "shared_expert.gate_up.weight",
            "shared_expert.down.weight",
        )
    ]
    assert {k.split(".router.")[0] for k in keys if ".router." in k} == {
        "layers.0.mlp",
        "layers.1.mlp",
    }


@pytest.mark.parametrize("shared", [0, 8])
def test_deepspeed_loads_a_state_dict_of_the_old_layout(shared, ds_ready):
    src = _tiny("deepspeed", seed=0, shared_expert_size=shared)
    old = _old_deepspeed_keys(src.state_dict())
    assert "layers.0.mlp.deepspeed_moe.gate.router.weight" in old
    assert "layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.down.weight" in old
    dst = _tiny("deepspeed", seed=1, shared_expert_size=shared)
    assert not torch.equal(dst.layers[0].mlp.router.weight, src.layers[0].mlp.router.weight)
    dst.load_state_dict(old, strict=True)
    got, want = dst.state_dict(), src.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    dst.load_state_dict(want, strict=True)  # the current names load as well
