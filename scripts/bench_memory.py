"""Peak memory of a training step of a mid-size HF MoE by ZeRO stage x activation checkpointing x LoRA.

Each configuration runs in fresh processes (``torchrun --nproc_per_node RANKS``) through
moespec's own engine (``build_engine``: the HF model with moespec's losses, DeepSpeed, AdamW)
and takes two optimizer steps. Measured per rank, the largest over the ranks: peak RSS of the
process (``--device cpu``; ``ru_maxrss``) or CUDA max allocated (``--device cuda``), and the
memory held once the engine is built. Beside them: the model states (parameters, gradients,
AdamW state) that the ZeRO stage leaves on each rank, from the parameter counts, and
DeepSpeed's own estimate (``estimate_zero2/3_model_states_mem_needs``, 16-bit mixed precision).

    python scripts/bench_memory.py --ranks 2 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {  # Qwen3-MoE: hidden 512, 2 layers, 32 experts, top-4, expert FFN 256
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 8192,
    "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
    "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True, "use_cache": False,
    "max_position_embeddings": 1024, "tie_word_embeddings": False, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "output_router_logits": False,
}  # fmt: skip
LORA = {"enabled": True, "rank": 16, "alpha": 32, "experts": True, "router_lora": True}
GIB = 2**30


def recipe(stage: int, ckpt: bool, lora: bool, config: str, args: argparse.Namespace) -> dict:
    """The TrainConfig overrides of one configuration."""
    return {
        "model": {"type": "hf", "config": config, "lora": LORA if lora else {"enabled": False}},
        "loss": {"aux": {"weight": 1e-3}, "orthogonality": {"weight": 1e-4},
                 "variance": {"weight": 1e-3}},
        "deepspeed": {"zero_stage": stage, "micro_batch_size": args.batch,
                      "precision": "bf16" if args.device == "cuda" else "fp32"},
        "trainer": {"activation_checkpointing": ckpt, "max_steps": 2},
        "data": {"seq_len": args.seq},
    }  # fmt: skip


# ------------------------------------------------------------------------- one rank


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def worker(spec: dict, out: Path) -> None:
    """Build the engine, take two steps, write this rank's figures to ``out``."""
    import torch
    from omegaconf import OmegaConf

    from moespec.routing import clear_router_losses, collect_router_losses
    from moespec.train.builders import build_engine
    from moespec.train.config import TrainConfig
    from moespec.train.launch import init_distributed

    rank, _ = init_distributed()
    cuda = spec.pop("device") == "cuda" and torch.cuda.is_available()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), spec))
    engine, model, _ = build_engine(cfg, MODEL["vocab_size"])
    built = torch.cuda.memory_allocated() / GIB if cuda else _rss_gib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(rank)
    shape = (cfg.deepspeed.micro_batch_size, cfg.data.seq_len)
    for _ in range(2):
        ids = torch.randint(0, MODEL["vocab_size"], shape, generator=gen).to(engine.device)
        out_ = engine(ids, ids)
        engine.backward(out_.loss + collect_router_losses(model).total)
        engine.step()
        clear_router_losses(model)
    peak = (
        torch.cuda.max_memory_allocated() / GIB
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    )
    total = sum(p.numel() for p in model.parameters() if not hasattr(p, "ds_numel"))
    total += sum(p.ds_numel for p in model.parameters() if hasattr(p, "ds_numel"))
    trainable = sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
    )
    largest = max(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    out.with_suffix(f".{rank}.json").write_text(
        json.dumps({"built": built, "peak": peak, "params": total, "trainable": trainable,
                    "largest": largest})
    )  # fmt: skip


# ------------------------------------------------------------------------- estimates


def model_states_gib(stage: int, params: int, trainable: int, ranks: int, bytes_: int) -> float:
    """Parameters, gradients and AdamW state left on one rank by the ZeRO stage."""
    frozen = params - trainable
    weights = (frozen + trainable) * bytes_ / (ranks if stage >= 3 else 1)
    grads = trainable * bytes_ / (ranks if stage >= 2 else 1)
    master = 0 if bytes_ == 4 else trainable * 4  # fp32 master weights of a 16-bit run
    adam = (trainable * 8 + master) / (ranks if stage >= 1 else 1)
    return (weights + grads + adam) / GIB


def deepspeed_estimate_gib(stage: int, params: int, largest: int, ranks: int) -> float:
    """DeepSpeed's own per-device estimate (no offload; it assumes 16-bit mixed precision)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, dev, *_ = estimate_zero3_model_states_mem_needs(  # (cpu, gpu[, largest layer])
            params, largest, ranks, 1, cpu_offload=False, cpu_offload_params=False
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, dev = estimate_zero2_model_states_mem_needs(params, ranks, 1, cpu_offload=False)
    return dev / GIB


# ------------------------------------------------------------------------- driver


def run_one(spec: dict, ranks: int, tmp: Path, name: str) -> dict:
    from moespec.train.launch import torchrun_launcher

    out = tmp / name
    cmd = [*torchrun_launcher(ranks), __file__,
           "--worker", json.dumps(spec), "--worker-out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(ranks)]
    return {k: max(r[k] for r in rows) for k in rows[0]}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    kind = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    bytes_ = 2 if args.device == "cuda" else 4
    head = (
        f"| ZeRO | act. ckpt | LoRA | {kind} (GiB) | after build (GiB) | step (GiB) "
        "| model states (GiB) | DeepSpeed estimate (GiB) |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        states = model_states_gib(r["stage"], r["params"], r["trainable"], args.ranks, bytes_)
        est = deepspeed_estimate_gib(r["stage"], r["trainable"], r["largest"], args.ranks)
        lines.append(
            f"| {r['stage']} | {'on' if r['ckpt'] else 'off'} | {'on' if r['lora'] else 'off'} "
            f"| {r['peak']:.2f} | {r['built']:.2f} | {r['peak'] - r['built']:.2f} "
            f"| {states:.2f} | {est:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="micro batch per rank")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--only", help="one configuration, e.g. z3_ac1_lora1")
    p.add_argument("--out", type=Path, help="append the table to this markdown file")
    p.add_argument(
        "--rows", type=Path, help="keep each configuration's figures in this jsonl as it is "
        "measured; configurations already there are not run again",
    )  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker), args.worker_out)
    stages = [int(s) for s in args.stages.split(",")]
    setting = {"device": args.device, "ranks": args.ranks, "batch": args.batch, "seq": args.seq}
    done = {}
    if args.rows and args.rows.is_file():
        for r in map(json.loads, args.rows.read_text().splitlines()):
            if r.get("setting") != setting:
                raise SystemExit(
                    f"{args.rows} holds figures of another setting ({r.get('setting')}, not "
                    f"{setting}): give another --rows file"
                )
            done[r["name"]] = r
    if args.rows:
        args.rows.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(MODEL))
        for stage, ckpt, lora in itertools.product(stages, (False, True), (False, True)):
            spec = {**recipe(stage, ckpt, lora, str(config), args), "device": args.device}
            name = f"z{stage}_ac{int(ckpt)}_lora{int(lora)}"
            if args.only and name != args.only:
                continue
            if name in done:
                rows.append(done[name])
                continue
            row = {"name": name, "setting": setting, "stage": stage, "ckpt": ckpt, "lora": lora}
            row.update(run_one(spec, args.ranks, Path(tmp), name))
            rows.append(row)
            print(name, json.dumps(row), flush=True)
            if args.rows:
                with args.rows.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    text = table(rows, args)
    print(text)
    if args.out:
        command = "python scripts/bench_memory.py " + " ".join(sys.argv[1:])
        with args.out.open("a") as f:
            f.write(f"\n```\n{command}\n```\n\n{text}")


if __name__ == "__main__":
    main()
