"""Training throughput of the smoke model: native vs deepspeed backend, EP=1 vs EP=2, and the
step-time share of the routing losses. Writes the `bench_train` section of docs/benchmarks.md.

    python scripts/bench_train.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import markdown_table, write_section

from moespec.train.launch import deepspeed_launcher

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], ranks: int, steps: int, workdir: Path) -> float:
    """Median tokens/s over the logged windows after the first one."""
    run_dir = workdir / name
    args = [
        "experiment=smoke", "trainer.progress=false", f"trainer.max_steps={steps}", "trainer.log_every=5",
        "trainer.eval_every=100000", "trainer.plot_every=100000", "trainer.save_every=100000",
        "wandb.enabled=false", "model.tiny.hidden_size=128", "model.tiny.num_layers=4", "moe.num_experts=8",
        "moe.ffn_size=256", "data.seq_len=128", "model.tiny.max_seq_len=128", f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    if ranks == 1:
        cmd = [sys.executable, "-m", "moespec.train", *args]
    else:
        cmd = [*deepspeed_launcher(ranks), "moespec.train", *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks)),
        "WANDB_MODE": "offline",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = sorted(r["train/tokens_per_s"] for r in rows[1:] if "train/tokens_per_s" in r)
    return tps[len(tps) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cases = [
        ("native, EP=1, 1 rank, aux+orth+var", ["moe=native", "loss=specialization"], 1),
        ("native, EP=1, 1 rank, no routing loss", ["moe=native", "loss=none"], 1),
        ("deepspeed, EP=1, 1 rank, aux+orth+var", ["moe=deepspeed", "loss=specialization"], 1),
        (
            "deepspeed, EP=1, 2 ranks, aux+orth+var",
            ["moe=deepspeed", "moe.ep_size=1", "loss=specialization"],
            2,
        ),
        (
            "deepspeed, EP=2, 2 ranks, aux+orth+var",
            ["moe=deepspeed", "moe.ep_size=2", "loss=specialization"],
            2,
        ),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides, ranks) in enumerate(cases):
            results[name] = run(f"case{i}", overrides, ranks, args.steps, Path(tmp))
            print(f"{name:<45} {results[name]:>10.0f} tokens/s", flush=True)
    base = results[cases[0][0]]
    rows = [[name, f"{tps:.0f}", f"{tps / base:.2f}"] for name, tps in results.items()]
    share = 1 - results[cases[0][0]] / results[cases[1][0]]
    body = markdown_table(["configuration", "tokens/s (all ranks)", "ratio to native EP=1"], rows)
    body += (
        f"\n\nStep-time share of the routing losses (aux+orthogonality+variance vs none, native): "
        f"{share * 100:.1f}%.\n\nSmoke model widened to 4 layers, hidden 128, 8 experts (FFN 256), top-2, "
        f"sequence 128, micro batch 4, {args.steps} steps; median over logging windows after the first."
    )
    print(f"routing-loss share of step time: {share * 100:.1f}%")
    write_section("bench_train", body)


if __name__ == "__main__":
    main()
