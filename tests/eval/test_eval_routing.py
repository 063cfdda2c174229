"""Routing statistics at evaluation time: the validation figures a run logs equal a plain loop
over the routing of the same validation batches; eval passes leave the training window alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moespec.eval.routing import EvalRouting
from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig
from moespec.routing import TokenContext, iter_routers, set_token_context


@pytest.fixture(scope="module")
def smoke_run(run_train, tmp_path_factory) -> Path:
    """4 smoke steps; the last step evaluates and saves, so the checkpoint is the model
    that was evaluated."""
    run_dir = tmp_path_factory.mktemp("eval_routing") / "run"
    proc = run_train(["experiment=smoke", "trainer.max_steps=4", "trainer.progress=false",
                      "wandb.enabled=false", f"hydra.run.dir={run_dir}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _routing_of_val_batches(run_dir: Path, trace_routing) -> tuple[list[list], int, int]:
    """Per layer, per token of the evaluated batches: (chosen experts, domain id, k outputs)."""
    from moespec.data.sampler import batch_iterator
    from moespec.train.runs import load_model

    loaded = load_model(run_dir, [])
    cfg, model = loaded.cfg, loaded.model.eval()
    micro = cfg.deepspeed.micro_batch_size
    batches = min(cfg.trainer.eval_batches, len(loaded.data.val) // micro)
    doms: list[int] = []
    it = batch_iterator(loaded.data.val, micro, seed=0, num_epochs=1)
    with trace_routing(model) as seen, torch.no_grad():
        for _ in range(batches):
            batch = next(it)
            model(batch["input_ids"])
            doms += batch["domain_ids"].reshape(-1).tolist()
    return (
        [[(c, d, ys) for (c, _, ys), d in zip(layer, doms)] for layer in seen],
        len(loaded.data.domains),
        cfg.moe.num_experts,
    )


def _layer_reference(tokens: list, num_domains: int, e: int) -> dict:
    """Load, MaxVio, load CV, dead experts, domain MI and output overlap by a plain loop."""
    slots = [0] * e
    joint = [[0] * num_domains for _ in range(e)]
    overlap = []
    for chosen, dom, ys in tokens:
        for a in chosen:
            slots[a] += 1
            if dom >= 0:
                joint[a][dom] += 1
        cos = [abs(float(torch.nn.functional.cosine_similarity(ys[i], ys[j], dim=0)))
               for i in range(len(ys)) for j in range(len(ys)) if i != j]  # fmt: skip
        overlap.append(sum(cos) / len(cos))
    total, mean = sum(slots), sum(slots) / e
    grand = sum(map(sum, joint))
    pe = [sum(r) / grand for r in joint]
    pd = [sum(r[d] for r in joint) / grand for d in range(num_domains)]
    mi = sum((c / grand) * math.log((c / grand) / (pe[a] * pd[d]))
             for a, r in enumerate(joint) for d, c in enumerate(r) if c)  # fmt: skip
    std = math.sqrt(sum((s - mean) ** 2 for s in slots) / e)
    return {
        "load": [s / total for s in slots],
        "maxvio": max(abs(s - mean) for s in slots) / mean,
        "load_cv": std / mean,
        "dead_experts": sum(s == 0 for s in slots),
        "domain_mi": mi / -sum(p * math.log(p) for p in pd if p),
        "output_overlap": sum(overlap) / len(overlap),
    }


def test_validation_routing_equals_a_plain_loop_over_the_same_batches(
    smoke_run, moespec_cache, monkeypatch, trace_routing
):
    monkeypatch.setenv("MOESPEC_CACHE", str(moespec_cache))
    rows = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in rows if r.get("step") == 4 and "val/loss" in r]
    per_layer, num_domains, e = _routing_of_val_batches(smoke_run, trace_routing)
    refs = [_layer_reference(tokens, num_domains, e) for tokens in per_layer]
    for i, ref in enumerate(refs):
        got = [logged[f"val/layer{i}/routing/load/expert{a}"] for a in range(e)]
        assert got == pytest.approx(ref["load"], rel=1e-12)
    mean = {k: sum(r[k] for r in refs) / len(refs) for k in ("maxvio", "load_cv", "domain_mi")}
    for key, want in mean.items():
        assert logged[f"val/routing/{key}"] == pytest.approx(want, rel=1e-6), key  # float32 std
    assert logged["val/routing/dead_experts"] == sum(r["dead_experts"] for r in refs)
    want = sum(r["output_overlap"] for r in refs) / len(refs)
    assert logged["val/routing/output_overlap"] == pytest.approx(want, abs=1e-5)


def test_an_eval_pass_leaves_the_training_window_and_switches_as_they_were():
    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=16)
    model = TinyMoELM(cfg, MoEConfig(num_experts=4, top_k=2, ffn_size=16))
    ids = torch.randint(0, 50, (2, 8))
    model(ids)  # the training window so far
    routers = iter_routers(model)
    routers[1].track_stats = False
    before = [r.stats.window.values() for r in routers]
    chosen: list[torch.Tensor] = []
    handle = routers[1].register_forward_hook(lambda m, a, out: chosen.append(out.idx))
    with EvalRouting(model) as routing:
        set_token_context(model, TokenContext(domain_ids=torch.tensor([0, 1] * 4)))
        model.eval()
        model(ids[:1])
        figures = routing.figures(all_reduce=False)
    handle.remove()
    assert [r.track_stats for r in routers] == [True, False]
    assert all(r.token_context is None and not r.raw_losses for r in routers)
    for r, values in zip(routers, before):
        after = r.stats.window.values()
        assert after.keys() == values.keys()
        assert all(torch.equal(torch.as_tensor(after[k]), torch.as_tensor(v))
                   for k, v in values.items())  # fmt: skip
    counts = torch.bincount(chosen[0].reshape(-1), minlength=4)  # the eval forward alone
    got = [figures[f"layer1/routing/load/expert{a}"] for a in range(4)]
    assert got == pytest.approx((counts / counts.sum()).tolist())
    assert 0 <= figures["routing/domain_mi"] <= 1
