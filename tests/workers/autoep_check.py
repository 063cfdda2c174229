"""Worker: DeepSpeed AutoEP against the unconverted transformers model, per family.

Usage: torchrun --nproc_per_node N tests/workers/autoep_check.py OUT.json FAMILY[,FAMILY...]
Each rank converts a tiny random model of the family with ``deepspeed.initialize`` (AutoEP,
``autoep_size`` = N) and runs its own shard of one batch; the reference is the same model
unconverted, with moespec attached the Hugging Face way, run on the same shard. Compared:
logits, every routing loss of every layer, the router and input-embedding gradients, the
layer's weights under the replaced block's names (experts gathered), and rows computed per routed row.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from moespec.hooks import find_moe_blocks
from moespec.models.autoep import (
    attach_autoep,
    autoep_layers,
    autoep_section,
    hf_state,
    install_compat,
)
from moespec.models.hf import attach
from moespec.models.hf_tiny import tiny_moe_model
from moespec.routing import LossConfig
from moespec.train.launch import init_distributed

TOL = dict(atol=1e-5, rtol=1e-5)


def loss_config() -> LossConfig:
    loss = LossConfig()
    loss.aux.weight = 0.01
    loss.orthogonality.weight = 0.5
    loss.orthogonality.variant = "cosine"  # O(0.1) values: a 1e-5 relative check means something
    loss.variance.weight = 0.25
    return loss


def run(model, handle, ids):
    """Logits, per-layer raw losses, and the gradients of LM + routing losses."""
    out = model(input_ids=ids, labels=ids, use_cache=False)
    routed = handle.collect_losses()
    (out.loss + routed.total).backward()
    losses = [{k: float(v) for k, v in p.raw_losses.items()} for p in handle.probes]
    return out.logits.detach(), losses


def check(family: str, rank: int, world: int) -> dict:
    ref = tiny_moe_model(family)
    model = tiny_moe_model(family)
    ids = torch.randint(
        0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank)
    )
    ref_handle = attach(ref, loss_config())
    ref.train()
    want_logits, want_losses = run(ref, ref_handle, ids)
    blocks = find_moe_blocks(ref)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 0},
        "expert_parallel": autoep_section(ref.config.model_type, world, verified=False),
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    layers = autoep_layers(engine.module)
    model_type = ref.config.model_type  # the language model's (multimodal families)
    handle = attach_autoep(engine.module, loss_config(), model_type)
    engine.module.train()
    got_logits, got_losses = run(engine.module, handle, ids)
    diff = float((got_logits - want_logits).abs().max())
    assert diff <= 1e-4, f"logits differ from the unconverted model's by up to {diff:.2g}"
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    assert len(got_losses) == len(want_losses) == len(blocks)
    for got, want in zip(got_losses, want_losses, strict=True):
        assert set(got) == set(want), (got, want)
        for k in want:
            assert abs(got[k] - want[k]) <= 1e-9 + 1e-5 * abs(want[k]), (k, got[k], want[k])
    for (_, layer), (_, block) in zip(layers, blocks, strict=True):
        torch.testing.assert_close(layer.router.gate.weight.grad, block.gate.weight.grad, **TOL)
        want = block.state_dict()
        got = hf_state(layer, model_type)  # the layer's weights under the block's own names
        assert set(got) == set(want), (sorted(got), sorted(want))
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    emb = engine.module.get_input_embeddings().weight.grad
    torch.testing.assert_close(emb, ref.get_input_embeddings().weight.grad, **TOL)
    rows = [int(layer.tokens_per_expert.sum()) for _, layer in layers]
    return {"ok": True, "reason": "", "model_type": model_type, "layers": len(layers),
            "routed_rows": rows}  # fmt: skip


def main() -> None:
    out, families = sys.argv[1], sys.argv[2].split(",")
    rank, world = init_distributed()
    install_compat()
    results = {}
    for family in families:  # both ranks see the same mismatch: no collective is left waiting
        try:
            results[family] = check(family, rank, world)
        except Exception as err:  # noqa: BLE001 - a family's failure is its row's reason
            reason = " ".join(str(err).split())[:200]
            results[family] = {"ok": False, "reason": f"{type(err).__name__}: {reason}"}
        print(f"autoep {family}: {results[family]}", flush=True)
        if rank == 0:  # after each family: a crash later keeps what was checked
            with open(out, "w") as f:
                json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
