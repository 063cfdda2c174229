"""Expert-parallel training steps on 2 ranks: moespec's dropless dispatch against DeepSpeed
AutoEP, and against the capacity-padded dispatch moespec had before (``--baseline DIR``: a
checkout of a commit before the dropless dispatch, imported in its place).

Each configuration runs in fresh processes (``torchrun --nproc_per_node 2``): a Qwen3-MoE built
from a config (hidden 256, 2 layers, 16 experts, top-4, expert FFN 128), moespec's losses
attached, DeepSpeed (ZeRO 0, AdamW), ``--steps`` timed steps after 2 warm-up steps on the same
batches. ``loss=aux_only`` and ``loss=specialization``, each on the model's own routing and on a
skewed one (the gates of 2 experts pulled towards the mean token, ``--skew``). Measured, summed
over ranks: rows the expert weights were applied to per routed row (a hook on the experts'
input), bytes sent to the other rank by all-to-all, and per rank the peak RSS; step time is the
median over steps of the slower rank.

    git worktree add /tmp/moespec-padded 80f5127  # the padded dispatch, for --baseline
    python scripts/bench_ep.py --baseline /tmp/moespec-padded
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, use_cache=False,
    max_position_embeddings=512,
)  # fmt: skip
LOSSES = {"aux_only": (0.01, 0.0, 0.0), "specialization": (0.01, 0.1, 1e-3)}  # aux, orth, var


# ------------------------------------------------------------------------- one rank


def _loss_config(name: str):
    from moespec.routing import LossConfig

    loss = LossConfig()
    loss.aux.weight, loss.orthogonality.weight, loss.variance.weight = LOSSES[name]
    if name == "specialization":
        loss.orthogonality.variant = "cosine"
    return loss


def _skew(model, ids, strength: float) -> None:
    """Pull the gates of experts 0 and 1 towards each layer's mean gate input."""
    import torch

    from moespec.hooks import find_moe_blocks

    means, hooks = {}, []
    for name, block in find_moe_blocks(model):
        hook = lambda m, a, n=name: means.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).mean(0))  # noqa: E731
        hooks.append(block.gate.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        for name, block in find_moe_blocks(model):
            m = means[name]
            block.gate.weight[:2] += strength * m / m.square().sum()


class _Meter:
    """Rows into the expert weights and bytes sent to other ranks by all-to-all."""

    def __init__(self, rank: int) -> None:
        import torch.distributed as dist

        self.rows = 0
        self.sent = 0
        original = dist.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
            row = input.numel() // max(input.shape[0], 1) * input.element_size()
            if input_split_sizes:
                self.sent += (sum(input_split_sizes) - input_split_sizes[rank]) * row
            else:
                self.sent += input.numel() * input.element_size() // 2  # 2 ranks, even split
            return original(output, input, output_split_sizes, input_split_sizes, **kw)

        dist.all_to_all_single = counted

    def hook(self, module, args) -> None:
        self.rows += args[0].reshape(-1, args[0].shape[-1]).shape[0]


def worker(spec: dict, out: Path) -> None:
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moespec.models.hf import attach
    from moespec.train.launch import init_distributed

    rank, world = init_distributed()
    meter = _Meter(rank)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **MODEL))
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, MODEL["vocab_size"], (4, 256), generator=gen) for _ in range(4)]
    if spec["skew"]:
        _skew(model, batches[0], spec["skew"])
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}
    loss = _loss_config(spec["loss"])
    if spec["path"] == "autoep":
        from moespec.models.autoep import attach_autoep, autoep_section, install_compat

        install_compat()
        config["expert_parallel"] = autoep_section("qwen3_moe", world)
        engine, *_ = deepspeed.initialize(model=model, optimizer=_adamw(model), config=config)
        handle = attach_autoep(engine.module, loss, "qwen3_moe")
        experts = [m.experts for m in engine.module.modules() if getattr(m, "_is_autoep_layer", 0)]
    else:
        from moespec.models.expert_parallel import convert_expert_parallel
        from moespec.moe import MoEConfig

        convert_expert_parallel(model, MoEConfig(backend="deepspeed", ep_size=world))
        handle = attach(model, loss)
        engine, *_ = deepspeed.initialize(model=model, optimizer=_adamw(model), config=config)
        experts = [
            e
            for m in model.modules()
            if hasattr(m, "deepspeed_experts")
            for e in m.deepspeed_experts
        ]
    for module in experts:
        module.register_forward_pre_hook(meter.hook)
    times, rows, sent, routed = [], 0, 0, 0
    for step in range(2 + spec["steps"]):
        meter.rows = meter.sent = 0
        torch.distributed.barrier()
        t0 = time.perf_counter()
        ids = batches[step % len(batches)]
        output = engine(input_ids=ids, labels=ids)
        engine.backward(output.loss + handle.collect_losses().total)
        engine.step()
        torch.distributed.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
            rows, sent = rows + meter.rows, sent + meter.sent
            routed += ids.numel() * MODEL["num_experts_per_tok"] * MODEL["num_hidden_layers"]
    stats = handle.collect_stats(all_reduce=True)
    maxvio = statistics.mean(s["maxvio"] for s in stats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = dict(times=times, rows=rows, sent=sent, routed=routed, maxvio=maxvio, rss_gib=peak)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _adamw(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4)


# ------------------------------------------------------------------------- launcher


def run(spec: dict, baseline: Path | None) -> dict:
    """One configuration on 2 fresh ranks; the figures summed or maxed over them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    if spec["path"] == "padded":
        env["PYTHONPATH"] = str(baseline)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", __file__, "--worker", json.dumps(spec), tmp]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{spec}: failed\n{proc.stderr[-3000:]}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    slowest = [max(step) for step in zip(*(r["times"] for r in ranks), strict=True)]
    return {
        "step_s": statistics.median(slowest),
        "rows_ratio": sum(r["rows"] for r in ranks) / sum(r["routed"] for r in ranks),
        "sent_mib": sum(r["sent"] for r in ranks) / len(slowest) / 2**20,
        "rss_gib": max(r["rss_gib"] for r in ranks),
        "maxvio": ranks[0]["maxvio"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skew", type=float, default=4.0, help="gate pull of the skewed runs")
    p.add_argument("--baseline", type=Path, help="a checkout with the capacity-padded dispatch")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker[0]), Path(args.worker[1]))
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchlib import markdown_table, write_section

    paths = (["padded"] if args.baseline else []) + ["dropless", "autoep"]
    rows = []
    for loss in LOSSES:
        for skew in (0.0, args.skew):
            found = {}
            for path in paths:
                spec = dict(path=path, loss=loss, skew=skew, steps=args.steps)
                found[path] = r = run(spec, args.baseline)
                print(f"{loss:14s} skew={skew:<4} {path:8s} " + json.dumps(r), flush=True)
            ref = found[paths[0]]["step_s"]
            for path, r in found.items():
                rows.append([
                    loss, "skewed" if skew else "model's own", f"{r['maxvio']:.2f}", path,
                    f"{1000 * r['step_s']:.0f}", f"{r['step_s'] / ref:.2f}",
                    f"{r['rows_ratio']:.2f}", f"{r['sent_mib']:.1f}", f"{r['rss_gib']:.2f}",
                ])  # fmt: skip
    header = ["loss", "routing", "MaxVio", "path", "step ms", f"vs {paths[0]}",
              "rows computed / routed", "all-to-all MiB / step", "peak RSS GiB / rank"]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        note = (
            "2 CPU ranks, EP=2, gloo. `padded`: the capacity-padded dispatch moespec had before "
            "(every expert computes the largest expert load of the step; `--baseline` is a "
            "checkout of it: `git worktree add /tmp/moespec-padded 80f5127`, left out without "
            "`--baseline`); `dropless`: moespec's "
            "dispatch now (`moe.backend=deepspeed`); `autoep`: DeepSpeed AutoEP "
            "(`moe.backend=autoep`). Rows: rows the expert weights were applied to, per routed "
            "row (AutoEP aligns each expert's rows to a multiple of 8)."
        )
        write_section("Expert parallel dispatch (scripts/bench_ep.py)", note + "\n\n" + table)


if __name__ == "__main__":
    main()
