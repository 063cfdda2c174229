"""``make demo``: train the tiny MoE LM with and without the specialization losses, compare.

Both runs use DeepSpeed's expert-parallel MoE (``moe.backend=deepspeed moe.ep_size=2``) over
2 ranks started by the DeepSpeed launcher, on the embedded three-domain corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .paths import torch_extensions_dir

RUNS = ("aux_only", "specialization")
ROWS = [
    ("val/loss", "validation loss", "lower"),
    ("routing/maxvio", "MaxVio (load imbalance)", None),
    ("routing/variance", "routing variance", "higher"),
    ("routing/output_overlap", "expert output overlap", "lower"),
    ("routing/domain_mi", "domain MI (normalised)", "higher"),
    ("routing/dead_experts", "dead experts", None),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(loss: str, out_dir: Path, ranks: int, overrides: list[str]) -> Path:
    """Run one training under the DeepSpeed launcher; returns its run directory."""
    run_dir = out_dir / loss
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", str(ranks),
        "--master_port", str(_free_port()),
        "--no_local_rank",
        "--module", "moespec.train",
        "experiment=demo",
        f"loss={loss}",
        "moe=deepspeed",
        f"moe.ep_size={ranks}",
        f"wandb.name=demo-{loss}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]  # fmt: skip
    print(f"\n$ {' '.join(cmd)}", flush=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {loss} run failed (exit {proc.returncode}); see {run_dir}")
    return run_dir


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def report(run_dirs: dict[str, Path]) -> str:
    """Side-by-side table of the two runs and a verdict on specialization."""
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in run_dirs.items()}
    base, spec = summaries["aux_only"], summaries["specialization"]
    domains = sorted(
        {k.split("/", 2)[2] for s in summaries.values() for k in s if k.startswith("val/loss/")}
    )
    rows = (
        ROWS[:1]
        + [(f"val/loss/{d}", f"  validation loss: {d}", "lower") for d in domains]
        + ROWS[1:]
    )
    lines = [f"{'metric':<30} {'aux_only':>12} {'specialization':>15}   better", "-" * 68]
    for key, label, better in rows:
        a, b = base.get(key), spec.get(key)
        mark = ""
        if better and a is not None and b is not None and a != b:
            mark = "specialization" if (b < a) == (better == "lower") else "aux_only"
        lines.append(f"{label:<30} {_fmt(a):>12} {_fmt(b):>15}   {mark}")
    overlap_fell = spec.get("routing/output_overlap", 1) < base.get("routing/output_overlap", 0)
    mi_rose = spec.get("routing/domain_mi", 0) > base.get("routing/domain_mi", 1)
    if overlap_fell and mi_rose:
        verdict = "Specialization rose: expert outputs overlap less and experts track domains more."
    elif overlap_fell or mi_rose:
        what = "output overlap fell" if overlap_fell else "domain MI rose"
        verdict = f"Specialization partly rose: {what}, the other metric did not improve."
    else:
        verdict = "Specialization did not rise in this run (try more steps or other loss weights)."
    lines += ["", verdict, ""]
    for name, d in run_dirs.items():
        load_maps = sorted((d / "plots").glob("expert_load_step*.png"))
        domain_maps = sorted((d / "plots").glob("expert_domain_step*.png"))
        wandb_runs = sorted((d / "wandb").glob("offline-run-*")) + sorted(
            (d / "wandb").glob("run-*")
        )
        lines.append(f"{name}: run dir {d}")
        lines.append(f"  expert-load heat map:   {load_maps[-1] if load_maps else '-'}")
        lines.append(f"  expert×domain heat map: {domain_maps[-1] if domain_maps else '-'}")
        lines.append(
            f"  wandb run: {wandb_runs[-1] if wandb_runs else '-'}  (sync with `wandb sync <dir>`)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both trainings and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the two runs go")
    parser.add_argument("--ranks", type=int, default=2, help="processes (= expert-parallel degree)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_dirs = {loss: launch(loss, args.out.resolve(), args.ranks, args.overrides) for loss in RUNS}
    print("\n" + report(run_dirs))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
