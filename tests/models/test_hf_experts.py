"""moespec through transformers' experts dispatch, over a diverse set of MoE families.

Each family is built tiny from its config class. References: the unattached model (logits),
``moespec.routing.losses`` on the router's own output and a per-token loop over the model's
eager experts (losses), and a dispatch-level count of expert matmuls (one pass).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from moespec.hooks import HookRegistry, count_hooks  # noqa: E402
from moespec.models import experts as X  # noqa: E402
from moespec.models.hf import attach, moe_blocks  # noqa: E402
from moespec.models.hf_tiny import tiny_moe_model  # noqa: E402
from moespec.routing import LossConfig  # noqa: E402
from moespec.routing import losses as L  # noqa: E402
from moespec.routing.router import ATTACHED_ROUTER_ATTR  # noqa: E402

FAMILIES = [
    "gpt_oss",  # interleaved gate/up, transposed, biases, clamped activation
    "glm4_moe",  # sigmoid scores, correction bias, grouped top-k, shared experts
    "deepseek_v2",  # MLA attention, softmax group-limited routing
    "qwen3_next",  # linear attention layers, gated shared expert
    "jamba",  # state-space layers between attention
    "deepseek_v3",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
]
SIGMOID = {"glm4_moe", "deepseek_v3"}
family_params = pytest.mark.parametrize("family", FAMILIES)


def loss_config(ortho: float = 1e-2) -> LossConfig:
    cfg = LossConfig()
    cfg.aux.weight = 1e-2
    cfg.orthogonality.weight = ortho
    cfg.variance.weight = 1e-2
    cfg.z.weight = 1e-3
    return cfg


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


@family_params
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_logits_equal_unattached(family: str, implementation: str) -> None:
    model = tiny_moe_model(family)
    model.set_experts_implementation(implementation)
    x = ids()
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            ref = logits(model, x)
        with attach(model, loss_config()) as handle, torch.no_grad():
            got = logits(model, x)
            assert all(p.raw_losses for p in handle)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert model.config._experts_implementation == implementation


def reference_raw(experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T,k,H] from the model's eager experts, one token and one expert at a time."""
    eager = type(experts).forward.__wrapped__
    one = torch.ones(1, 1, dtype=x.dtype)
    return torch.stack(
        [
            torch.stack(
                [
                    eager(experts, x[t : t + 1], idx[t : t + 1, j : j + 1], one)[0]
                    for j in range(idx.shape[1])
                ]
            )
            for t in range(x.shape[0])
        ]
    )


@family_params
def test_losses_match_reference(family: str) -> None:
    model = tiny_moe_model(family).train()
    seen: dict[int, dict[str, torch.Tensor]] = {}
    reg = HookRegistry()
    with attach(model, loss_config()) as handle:
        for i, p in enumerate(handle.probes):
            rec = seen.setdefault(i, {})
            reg.add_forward("t", p.gate, lambda m, a, o, rec=rec: rec.update(first=o[0].detach()))
            reg.add_forward_pre(
                "t", p.experts, lambda m, a, rec=rec: rec.update(x=a[0].detach(), idx=a[1], w=a[2])
            )
        with reg.group("t"), torch.no_grad():
            out = logits(model, ids())
        for i, p in enumerate(handle.probes):
            rec = seen[i]
            first = rec["first"].reshape(-1, p.num_experts).float()
            if family in SIGMOID:
                s = first.sigmoid()
                scores = s / s.sum(-1, keepdim=True)
            else:
                scores = first.softmax(-1)
            raw = reference_raw(p.experts, rec["x"], rec["idx"])
            expected = {
                "aux": L.load_balancing_loss(scores, rec["idx"], p.num_experts),
                "variance": L.variance_loss(scores),
                "z": L.z_loss(first),
                "orthogonality": L.orthogonality_loss(raw.float(), "projection"),
            }
            assert set(p.raw_losses) == set(expected)
            for name, value in expected.items():
                torch.testing.assert_close(
                    p.raw_losses[name].detach().float(), value, atol=1e-6, rtol=1e-4, msg=name
                )
    assert torch.isfinite(out).all() and count_hooks(model) == 0


class ExpertMatmuls(TorchDispatchMode):
    """Counts matmuls reading an expert weight, and the rows each one multiplies."""

    _MM = ("mm", "bmm", "addmm", "grouped_mm", "_grouped_mm", "linear", "matmul")

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr() for w in weights}
        self.calls = 0
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.split(".")[-1]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        reads = [a for a in tensors if a.untyped_storage().data_ptr() in self.ptrs]
        if name in self._MM and reads:
            self.calls += 1
            other = next(a for a in tensors if a.untyped_storage().data_ptr() not in self.ptrs)
            self.rows += other.shape[0] if other.dim() == 2 else other.shape[0] * other.shape[1]
        return func(*args, **(kwargs or {}))


def _expert_weights(model) -> list[torch.Tensor]:
    out = []
    for _, block in moe_blocks(model)[2]:
        ex = block.experts
        out.append(ex.gate_up_proj if ex.has_gate else ex.up_proj)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "glm4_moe"])
@pytest.mark.parametrize("ortho", [0.0, 1e-2])
@pytest.mark.parametrize("training", [True, False])
def test_each_routed_expert_runs_once(family: str, ortho: float, training: bool) -> None:
    """One grouped pass per block over the T·k routed (token, expert) pairs, in any mode."""
    model = tiny_moe_model(family).train(training)
    x = ids()
    blocks = len(moe_blocks(model)[2])
    k = model.config.num_experts_per_tok
    with attach(model, loss_config(ortho)) as handle:
        counter = ExpertMatmuls(_expert_weights(model))
        with counter:
            out = logits(model, x)
        total = handle.collect_losses().total
        if training:
            (out.float().square().mean() + total).backward()
    assert counter.calls == blocks, counter.calls
    assert counter.rows == blocks * x.numel() * k, counter.rows


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_next"])
def test_detach_restores_implementation(family: str) -> None:
    model = tiny_moe_model(family)
    model.set_experts_implementation("eager")
    keys = list(model.state_dict())
    handle = attach(model, loss_config())
    assert model.config._experts_implementation == X.IMPLEMENTATION
    logits(model, ids())
    handle.detach()
    assert model.config._experts_implementation == "eager"
    assert count_hooks(model) == 0 and list(model.state_dict()) == keys
    for _, block in moe_blocks(model)[2]:
        assert ATTACHED_ROUTER_ATTR not in block.__dict__
        assert X.EXPERTS_PROBE_ATTR not in block.experts.__dict__


def test_interface_check_names_what_moved(monkeypatch) -> None:
    from transformers.integrations import moe

    monkeypatch.delattr(moe, "_grouped_linear")
    with pytest.raises(RuntimeError, match=r"lacks \['_grouped_linear'\]"):
        attach(tiny_moe_model("qwen3_moe"), loss_config())
