"""Peak host memory per rank of expert-parallel training at EP=2: loading, a step, the export.

A synthetic Qwen3-MoE checkpoint of about ``--gb`` GB (float32 safetensors, written once under
``build/``) is trained by 2 ranks (``torchrun``) through moespec's own builders: ``build_engine``
(the checkpoint loaded, its experts sharded over the ranks, DeepSpeed ZeRO-1, AdamW), one
optimizer step, then ``export_pretrained`` (the plain transformers checkpoint). After each phase
every rank reads its peak RSS (``ru_maxrss``); the table gives the largest over the ranks, less
what the process held before loading, as a multiple of the checkpoint's size. With the experts
sharded, the ideal is about 1/EP of the experts plus the replicated rest.

    python scripts/bench_ep_memory.py --gb 3 [--backend deepspeed,autoep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
BASE = dict(
    vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
    num_attention_heads=8, num_key_value_heads=4, head_dim=128, num_experts=32,
    num_experts_per_tok=4, norm_topk_prob=True, use_cache=False, max_position_embeddings=512,
    tie_word_embeddings=False,
)  # fmt: skip


def checkpoint(gb: float) -> Path:
    """The synthetic checkpoint of about ``gb`` GB (float32), written once."""
    per_layer = BASE["num_experts"] * 3 * BASE["hidden_size"] * BASE["moe_intermediate_size"] * 4
    layers = max(2, round(gb * 1e9 / per_layer))
    path = ROOT / "build" / f"ep_memory_qwen3_moe_{layers}l"
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, **BASE)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(path)
        del model
    return path


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(spec: dict, out: Path) -> None:
    """Load, one step, export; this rank's peak RSS after each phase."""
    import torch
    from omegaconf import OmegaConf

    from moespec.routing import clear_router_losses, collect_router_losses
    from moespec.train.builders import build_engine
    from moespec.train.config import TrainConfig
    from moespec.train.launch import init_distributed

    rank, _ = init_distributed()
    peaks = {"start": _peak_gib()}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), spec))
    engine, model, _ = build_engine(cfg, BASE["vocab_size"])
    peaks["load"] = _peak_gib()
    ids = torch.randint(
        0, BASE["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(rank)
    )
    output = engine(ids, ids)
    engine.backward(output.loss + collect_router_losses(model).total)
    engine.step()
    clear_router_losses(model)
    peaks["step"] = _peak_gib()
    with tempfile.TemporaryDirectory() as tmp:
        model.export_pretrained(Path(tmp) / "hf_model")
        peaks["export"] = _peak_gib()
    out.with_suffix(f".{rank}.json").write_text(json.dumps(peaks))


def run(backend: str, ckpt: Path, tmp: Path) -> dict[str, float]:
    """One 2-rank run; per phase the largest peak over the ranks, less the start, in GiB."""
    from moespec.train.launch import torchrun_launcher

    spec = {"model": {"type": "hf", "name_or_path": str(ckpt)},
            "moe": {"backend": backend, "ep_size": 2},
            "loss": {"aux": {"weight": 1e-2}, "orthogonality": {"weight": 0.1},
                     "variance": {"weight": 1e-3}},
            "deepspeed": {"zero_stage": 1, "micro_batch_size": 1},
            "trainer": {"max_steps": 1}, "data": {"seq_len": 64}}  # fmt: skip
    out = tmp / backend
    cmd = [*torchrun_launcher(2), __file__, "--worker", json.dumps(spec), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{backend}: failed\n{proc.stderr[-3000:]}")
    ranks = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(2)]
    return {p: max(r[p] - r["start"] for r in ranks) for p in ("load", "step", "export")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.0, help="checkpoint size (float32)")
    p.add_argument("--backend", default="deepspeed,autoep")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker[0]), Path(args.worker[1]))
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchlib import markdown_table, write_section

    ckpt = checkpoint(args.gb)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / GIB
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backend.split(","):
            peaks = run(backend, ckpt, Path(tmp))
            print(backend, json.dumps(peaks), flush=True)
            rows.append([backend] + [f"{peaks[k]:.2f} ({peaks[k] / size:.2f}x)" for k in peaks])
    header = ["moe.backend", "load: GiB (x checkpoint)", "+ one step", "+ export"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        note = (
            f"A Qwen3-MoE checkpoint of {size:.2f} GiB (float32; {ckpt.name}), 2 CPU ranks, "
            "EP=2, ZeRO-1, AdamW. Peak RSS per rank after each phase (the largest over the "
            "ranks, less what the process held before loading; peaks only grow). Goal: 0.6x "
            "the checkpoint at EP=2."
        )
        write_section("Expert-parallel memory (scripts/bench_ep_memory.py)", note + "\n\n" + table)


if __name__ == "__main__":
    main()
