"""The expert-parallel column of ``scripts/hf_coverage.py``: one rank of a 2-rank launch.

Every rank loops over the families: builds the tiny model (same seed on every rank), checks
that its experts converted to DeepSpeed expert parallel over all ranks give the one-process
model's logits and loss (LM + routing losses, 1e-5) on this rank's shard, and trains 2 steps
through a DeepSpeed engine. A family that fails is reported and the loop goes on.

    torchrun --nproc_per_node 2 scripts/hf_coverage_ep.py OUT.json gpt_oss:gpt_oss,...
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_coverage import VOCAB, _loss_config, _outputs, _reason  # noqa: E402

from moespec.models.hf_tiny import tiny_moe_model  # noqa: E402

TOL = 1e-5


def _loss(model, handle, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from moespec.models.tiny import lm_output

    logits = _outputs(model, ids)
    return logits, lm_output(logits[:, :-1], ids[:, 1:]).loss + handle.collect_losses().total


def _engine(model):
    import deepspeed

    from moespec.train.builders import optimizer_groups

    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def check_ep(model_type: str, rank: int, world: int) -> list[float]:
    """Logits and loss of the expert-parallel model equal the one-process model's; 2 steps."""
    from moespec.models.expert_parallel import convert_expert_parallel
    from moespec.models.hf import attach
    from moespec.moe import MoEConfig

    model = tiny_moe_model(model_type).float()
    ids = torch.randint(0, VOCAB, (world, 8), generator=torch.Generator().manual_seed(1))
    ids = ids[rank : rank + 1]
    cfg = _loss_config(aux=1e-2, orthogonality=1e-2, variance=1e-2, z=1e-3)
    ref = copy.deepcopy(model).train()
    with attach(ref, cfg) as handle:
        ref_logits, ref_loss = _loss(ref, handle, ids)
    ep = copy.deepcopy(model).train()
    convert_expert_parallel(ep, MoEConfig(backend="deepspeed", ep_size=world))
    handle = attach(ep, cfg)
    logits, loss = _loss(ep, handle, ids)
    err = (logits - ref_logits).abs().max().item()
    if err > TOL:
        raise AssertionError(f"logits differ by {err:.2e}")
    if abs(loss.item() - ref_loss.item()) > TOL * max(1.0, abs(ref_loss.item())):
        raise AssertionError(f"loss {loss.item():.6g} != {ref_loss.item():.6g}")
    engine = _engine(ep)
    losses = []
    for _ in range(2):
        _, loss = _loss(engine, handle, ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    if not all(torch.isfinite(torch.tensor(losses))):
        raise AssertionError(f"non-finite loss {losses}")
    return losses


def main() -> None:
    from moespec.train.launch import init_distributed

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    out, todo = Path(sys.argv[1]), [t.split(":") for t in sys.argv[2].split(",") if t]
    rank, world = init_distributed(timeout_s=float(os.environ.get("MOESPEC_EP_TIMEOUT", 300)))
    results = {}
    for family, model_type in todo:
        try:
            mine = {"ok": True, "losses": check_ep(model_type, rank, world)}
        except Exception as err:  # noqa: BLE001 - reported in the table
            mine = {"ok": False, "reason": f"rank {rank}: {_reason(err)}"}
        everyone: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(everyone, mine)
        failed = [r for r in everyone if not r["ok"]]
        results[family] = {"ok": not failed, "reason": failed[0]["reason"] if failed else ""}
        if rank == 0:
            print(f"ep {family:24s} {'PASS' if not failed else 'FAIL'} {results[family]['reason']}")
            out.write_text(json.dumps(results))  # after each family: a crash keeps the rest
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
