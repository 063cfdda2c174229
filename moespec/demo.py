"""``make demo``: train the tiny MoE LM with and without the specialization losses, compare.

Both runs use DeepSpeed's expert-parallel MoE (``moe.backend=deepspeed moe.ep_size=2``) over
2 ranks started by the DeepSpeed launcher, on the embedded three-domain corpus; ends with the
expert specialization report of both runs on the validation split (``<out>/report``).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .paths import torch_extensions_dir
from .report.compare import markdown_table, plot_curves
from .train.launch import deepspeed_launcher
from .train.run_metrics import load_run

RUNS = ("aux_only", "specialization")


def launch(loss: str, out_dir: Path, ranks: int, overrides: list[str]) -> Path:
    """Run one training under the DeepSpeed launcher; returns its run directory."""
    run_dir = out_dir / loss
    cmd = [
        *deepspeed_launcher(ranks),
        "moespec.train",
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


def cost_line(base: dict[str, float], spec: dict[str, float], budget: float | None) -> str:
    """What this one seed says of the price: validation loss and load balance against aux-only."""
    vb, vs = base.get("val/loss", math.nan), spec.get("val/loss", math.nan)
    change = (vs - vb) / vb if vb else math.nan
    word = "lower" if change < 0 else "higher" if change > 0 else "the same"
    balance = spec.get("routing/relative_maxvio", math.nan)
    return (
        f"Validation loss {vs:.4g} against {vb:.4g} ({abs(change):.1%} {word}); MaxVio is "
        f"{balance:.0%} of its largest possible value (loss.balance.max_maxvio={budget}). One seed: "
        "docs/specialization.md gives the matrix over seeds and settings."
    )


def report(run_dirs: dict[str, Path]) -> str:
    """Side-by-side table of the two runs, a verdict on specialization and where to look next."""
    runs = [load_run(d) for d in run_dirs.values()]
    base, spec = (r.summary for r in runs)
    lines = [markdown_table(runs, list(run_dirs))]
    overlap_fell = spec.get("routing/output_overlap", 1) < base.get("routing/output_overlap", 0)
    mi_rose = spec.get("routing/domain_mi", 0) > base.get("routing/domain_mi", 1)
    if overlap_fell and mi_rose:
        verdict = "Specialization rose: expert outputs overlap less and experts track domains more."
    elif overlap_fell or mi_rose:
        what = "output overlap fell" if overlap_fell else "domain MI rose"
        verdict = f"Specialization partly rose: {what}, the other metric did not improve."
    else:
        verdict = "Specialization did not rise in this run (try more steps or other loss weights)."
    spec_config = OmegaConf.load(list(run_dirs.values())[1] / ".hydra" / "config.yaml")
    verdict += " " + cost_line(base, spec, spec_config.loss.balance.max_maxvio)
    out_dir = Path(os.path.commonpath(list(run_dirs.values())))
    curves = plot_curves(runs, list(run_dirs), out_dir / "comparison.png")
    lines += ["", verdict, "", f"metric curves of both runs: {curves}"]
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


def write_report(run_dirs: dict[str, Path], out: Path) -> Path:
    """``moespec-report`` of the runs on their validation split (one process); its page."""
    cmd = [sys.executable, "-m", "moespec.report", *map(str, run_dirs.values()),
           "--data", "val", "--names", *run_dirs, "--out", str(out)]  # fmt: skip
    print(f"\n$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the report failed (exit {proc.returncode})")
    return out / "report.html"


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
    page = write_report(run_dirs, args.out.resolve() / "report")
    print(f"\nexpert specialization report: {page}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
