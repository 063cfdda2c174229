"""Compare training runs: a table of their final metrics and a plot of the metrics over steps.

    moespec-compare multirun/2026-11-25/23-02-55             # every run of a Hydra sweep
    moespec-compare runs/demo/aux_only runs/demo/specialization --plot demo.png

Each argument is a run directory (it holds ``metrics.jsonl``) or a sweep directory whose
sub-directories are runs. Runs are labelled by the Hydra overrides that differ between them.
Runs that differ only in ``trainer.seed`` form a group: a second table gives each group's
mean ± standard deviation and its paired difference from the first group with a 95% interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..routing.losses import LOSSES
from ..routing.metric_table import shown_in
from ..train.run_metrics import CompareError, Run, load_run
from .seed_statistics import SeedGroup, group_by_seed, mean_std, paired_difference

#: (metric key, label, which way is better: "lower", "higher" or None)
TABLE_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("val/loss", "validation loss", "lower"),
    ("train/lm_loss", "train LM loss (last step)", "lower"),
    *((f"routing/{m.name}", m.label, m.better) for m in shown_in("compare")),
    ("balance/yield", "balance yield (1 = not yielding)", None),
)
#: The routing of the validation batches (logged with ``val/loss``).
VAL_ROUTING_METRICS: tuple[tuple[str, str, str | None], ...] = tuple(
    (f"val/routing/{m.name}", f"validation: {m.short}", m.better) for m in shown_in("validation")
)
#: The panels of the curves plot, in order; missing ones are skipped.
PLOT_METRICS: tuple[str, ...] = (
    "train/lm_loss",
    "val/loss",
    *(f"routing/{m.name}" for m in shown_in("plot")),
)


def _sort_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def find_runs(paths: list[Path]) -> list[Run]:
    """Runs named by ``paths``: run directories, or sweep directories holding runs."""
    if not paths:
        raise CompareError("give at least one run or sweep directory")
    runs = []
    for path in paths:
        if not path.exists():
            raise CompareError(f"{path}: no such directory")
        if not path.is_dir():
            raise CompareError(f"{path} is a file; give the run directory that holds it")
        if (path / "metrics.jsonl").is_file():
            runs.append(load_run(path))
            continue
        children = sorted(
            (p for p in path.iterdir() if (p / "metrics.jsonl").is_file()), key=_sort_key
        )
        if not children:
            raise CompareError(
                f"{path}: neither a run directory (no metrics.jsonl) nor a sweep directory "
                "(no sub-directory holds one); give hydra.run.dir or hydra.sweep.dir of a run"
            )
        runs.extend(load_run(p) for p in children)
    return runs


def run_labels(runs: list[Run]) -> list[str]:
    """Label each run by the overrides that differ between the runs, else by its directory.

    Overrides that only say how a run was launched (resume, stop_after, hydra.*) do not count.
    """
    parsed = [
        dict(o.split("=", 1) if "=" in o else (o, "") for o in r.overrides if _describes_run(o))
        for r in runs
    ]
    keys = sorted({k for p in parsed for k in p})
    differing = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    labels = [
        " ".join(f"{k}={p[k]}" for k in differing if k in p) or r.path.name
        for p, r in zip(parsed, runs)
    ]
    if len(set(labels)) < len(labels):  # same overrides (e.g. two seeds of one recipe)
        labels = [f"{label} ({r.path.name})" for label, r in zip(labels, runs)]
    return labels


_LAUNCH_KEYS = ("trainer.resume", "trainer.stop_after", "trainer.progress", "hydra.")


def _describes_run(override: str) -> bool:
    return not override.lstrip("+~").startswith(_LAUNCH_KEYS)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def table_rows(runs: list[Run]) -> list[tuple[str, str, str | None]]:
    """The rows of the comparison: the default metrics plus per-domain validation loss and
    the routing of the validation batches."""
    domains = sorted(
        {k[len("val/loss/") :] for r in runs for k in r.summary if k.startswith("val/loss/")}
    )
    rows = list(TABLE_METRICS[:1])
    rows += [(f"val/loss/{d}", f"validation loss: {d}", "lower") for d in domains]
    rows += VAL_ROUTING_METRICS
    rows += TABLE_METRICS[1:]
    keys = {k for r in runs for k in r.summary}
    rows += eval_rows(keys)
    rows += loss_rows(keys)
    return [row for row in rows if any(row[0] in r.summary for r in runs)]


#: Figures of evaluation sets shown by compare: ``eval/<set>/<metric>``, and which way is better.
EVAL_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("accuracy", "accuracy", "higher"),
    ("loss", "loss", "lower"),
    *((f"routing/{m.name}", m.short, m.better) for m in shown_in("validation")),
)


def eval_rows(keys: set[str]) -> list[tuple[str, str, str | None]]:
    """Rows for the evaluation sets (``eval.sets``) the runs logged, per set and domain."""
    sets = sorted({k.split("/")[1] for k in keys if k.startswith("eval/")})
    rows: list[tuple[str, str, str | None]] = []
    for name in sets:
        for metric, label, better in EVAL_METRICS:
            rows.append((f"eval/{name}/{metric}", f"{name}: {label}", better))
        prefix = f"eval/{name}/accuracy/"
        for key in sorted(k for k in keys if k.startswith(prefix)):
            rows.append((key, f"{name}: accuracy {key[len(prefix) :]}", "higher"))
    return rows


def loss_rows(keys: set[str]) -> list[tuple[str, str, str | None]]:
    """Rows from the loss table: the weight of each calibrating loss (``β (orthogonality
    weight)``), and the raw value of each loss that is not built in; unknown names last."""
    known = [n for n in LOSSES if f"weights/{n}" in keys or f"loss/{n}" in keys]
    others = sorted(
        {k.split("/", 1)[1] for k in keys if k.startswith(("weights/", "loss/"))} - set(LOSSES)
    )
    rows: list[tuple[str, str, str | None]] = []
    for name in known + others:
        entry = LOSSES.get(name)
        if entry is None or not entry.builtin:
            rows.append((f"loss/{name}", f"{name} loss", None))
        if entry is None or entry.calibrates:
            symbol = f"{entry.symbol} " if entry is not None and entry.symbol else ""
            rows.append(
                (
                    f"weights/{name}",
                    f"{symbol}({name} weight)" if symbol else f"{name} weight",
                    None,
                )
            )
    return rows


def markdown_table(runs: list[Run], labels: list[str] | None = None) -> str:
    """Runs as columns, metrics as rows; the best value of a row with a direction is bold."""
    labels = labels or run_labels(runs)
    lines = [
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(runs),
        "| steps | " + " | ".join(str(r.last_step) for r in runs) + " |",
    ]
    for key, label, better in table_rows(runs):
        values = [r.summary.get(key) for r in runs]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        best = None
        if better and len({_fmt(v) for v in finite}) > 1:  # a tie as printed has no winner
            best = _fmt(min(finite) if better == "lower" else max(finite))
        cells = [f"**{_fmt(v)}**" if _fmt(v) == best else _fmt(v) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(r.alerts for r in runs):
        lines.append("| routing alarms | " + " | ".join(str(len(r.alerts)) for r in runs) + " |")
    return "\n".join(lines)


def _pm(mean: float, sd: float) -> str:
    return _fmt(mean) if not math.isfinite(sd) else f"{_fmt(mean)} ± {sd:.2g}"


def seed_groups(runs: list[Run]) -> tuple[list[SeedGroup], list[str]]:
    """Runs grouped by every override but ``trainer.seed``, and a label per group (the
    overrides that differ between groups, else the first run's directory name)."""
    kept = [[o for o in r.overrides if _describes_run(o)] for r in runs]
    groups = group_by_seed(kept)
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in g.overrides) for g in groups]
    keys = sorted({k for p in parsed for k in p})
    differing = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    labels = [" ".join(f"{k}={p[k]}" for k in differing if k in p) or runs[g.members[0]].path.name
              for p, g in zip(parsed, groups)]  # fmt: skip
    return groups, labels


def seed_table(runs: list[Run]) -> str | None:
    """Mean ± standard deviation over the seeds of each group, and each group's paired
    difference from the first with its 95% t interval (``*``: the interval excludes 0).
    None when no group holds two seeds, or when two runs share overrides and seed."""
    try:
        groups, labels = seed_groups(runs)
    except ValueError:  # the same recipe and seed twice (a rerun): nothing to pair by seed
        return None
    if not any(len(g.members) > 1 for g in groups):
        return None
    head = [f"{lab} (seeds {','.join(map(str, g.seeds))})" for lab, g in zip(labels, groups)]
    head += [f"{lab} − {labels[0]} [95% CI]" for lab in labels[1:]]
    lines = ["| metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for key, label, _ in table_rows(runs):
        by_seed = [{seed: runs[i].summary[key] for i, seed in zip(g.members, g.seeds)
                    if key in runs[i].summary} for g in groups]  # fmt: skip
        cells = [_pm(*mean_std(list(v.values()))) if v else "-" for v in by_seed]
        for other in by_seed[1:]:
            d = paired_difference(by_seed[0], other)
            if d is None:
                cells.append("-")
            elif len(d.seeds) < 2:
                cells.append(f"{d.mean:+.3g} (1 seed)")
            else:
                star = " *" if d.significant else ""
                cells.append(f"{d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}]{star}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[Run], labels: list[str], path: Path) -> Path:
    """One panel per metric of ``PLOT_METRICS`` that any run logged, one line per run."""
    from ..train.plots import plot_metric_curves

    curves = {
        key: [(label, *run.series(key)) for run, label in zip(runs, labels)] for key in PLOT_METRICS
    }
    return plot_metric_curves(
        {k: v for k, v in curves.items() if any(steps for _, steps, _ in v)}, path
    )


def _default_plot_path(paths: list[Path], runs: list[Run]) -> Path:
    if len(paths) == 1 and not (paths[0] / "metrics.jsonl").is_file():
        return paths[0] / "comparison.png"  # a sweep directory
    return Path(os.path.commonpath([r.path.resolve() for r in runs])) / "comparison.png"


def main(argv: list[str] | None = None) -> int:
    """``moespec-compare``: print the table, write the plot; exit 2 with one line on bad input."""
    parser = argparse.ArgumentParser(
        prog="moespec-compare",
        description="Compare moespec training runs: final metrics side by side, curves over steps.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument(
        "--plot",
        type=Path,
        help="where the curves PNG goes (default: comparison.png beside the runs)",
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--json", action="store_true", help="print the runs' final metrics as JSON")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labels = run_labels(runs)
    note = ""
    if not args.no_plot:  # the figure first: a closed pipe on stdout must not cost it
        target = args.plot or _default_plot_path(args.paths, runs)
        try:
            plot_curves(runs, labels, target)
            note = f"\ncurves: {target}"
        except OSError as err:
            print(f"error: cannot write the plot to {target}: {err.strerror}", file=sys.stderr)
            return 2
        except ValueError as err:  # nothing logged yet: the table is all there is
            print(f"\nno curves: {err}", file=sys.stderr)
    try:
        if args.json:
            rows = [
                {"run": str(r.path), "label": lab, "steps": r.last_step, **r.summary}
                for r, lab in zip(runs, labels)
            ]
            print(json.dumps(rows, indent=2))
        else:
            print(markdown_table(runs, labels))
            if grouped := seed_table(runs):
                print("\nruns grouped by trainer.seed (mean ± std; * = 95% interval excludes 0):")
                print(grouped)
        if note:
            print(note, file=sys.stderr if args.json else sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `moespec-compare ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
