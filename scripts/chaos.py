"""Fault injection over the smoke recipe: faults at seeded random steps, resume after each.

Runs ``experiment=smoke`` on 2 CPU ranks under the DeepSpeed launcher with expert parallelism 2,
once uninterrupted (the reference) and as one chain of segments: each segment resumes with
``trainer.resume=auto`` and meets one fault (SIGTERM to every rank, SIGKILL of rank 1, SIGKILL
inside a save, ENOSPC inside a save); the last one runs to the end. NaN micro-batches
(``trainer.nonfinite=skip``) run as a second chain, since a skipped step changes what follows.
Prints a table: fault, trials, survived, steps lost, final loss difference; ``--docs`` puts it
in ``docs/reliability.md``.

    python scripts/chaos.py --faults 20 --seed 0 --docs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moespec.train.launch import deepspeed_launcher  # noqa: E402

KINDS = ("SIGTERM (preemption)", "SIGKILL of rank 1", "SIGKILL inside a save", "ENOSPC in a save")
NAN = "NaN in a micro-batch"
SAVE_FILES = [
    "*model_states.pt",
    "*optim_states.pt",
    "rank*_state.pt",
    "trainer_state.json",
    "COMPLETE",
]
SAVE_EVERY = 2
PREEMPT_CODE = 75
TIMEOUT_S = 300  # above the longest wait between collectives of setup on a busy machine


@dataclass
class Outcome:
    """One fault kind's trials."""

    trials: int = 0
    survived: int = 0
    steps_lost: int = 0
    rows_lost: int = 0
    exit_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def overrides(run: Path, steps: int, resume: bool) -> list[str]:
    return [
        "experiment=smoke", "moe=deepspeed", "moe.ep_size=2", "trainer.progress=false",
        f"trainer.max_steps={steps}", "trainer.log_every=1", f"trainer.save_every={SAVE_EVERY}",
        "trainer.eval_every=1000", "trainer.plot_every=1000", "trainer.keep_checkpoints=2",
        "trainer.nonfinite=skip", f"trainer.collective_timeout_s={TIMEOUT_S}", "wandb.enabled=false",
        f"trainer.resume={'auto' if resume else 'none'}", f"hydra.run.dir={run}",
    ]  # fmt: skip


def rows(run: Path) -> dict[int, dict]:
    """metrics.jsonl by step (alerts apart)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "alert" not in row:
            out[row["step"]] = row
    return out


def same_row(a: dict, b: dict | None) -> bool:
    """The same logged figures, throughput apart (a step redone after a resume is timed anew)."""
    return b is not None and {k: v for k, v in a.items() if not k.endswith("_per_s")} == {
        k: v for k, v in b.items() if not k.endswith("_per_s")
    }


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks under the launcher, by rank."""
    found = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
            env_rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if "moespec.train" in line and "deepspeed.launcher" not in line and env_rank is not None:
            found.append((int(env_rank), child))
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie waiting for the launcher to reap it."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def segment(run: Path, steps: int, resume: bool, faults: str = "", signal_at: tuple | None = None):
    """One launch; ``signal_at=(step, kind)`` signals the ranks once ``step`` is logged.

    Returns (exit code, seconds from the signal until the last rank not signalled ended, log
    tail); after a SIGTERM, that is until every rank ended.
    """
    env = {**os.environ, "MOESPEC_FAULTS": faults, "OMP_NUM_THREADS": "1"}
    log = run.parent / f"{run.name}-{time.time_ns()}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [*deepspeed_launcher(2), "moespec.train", *overrides(run, steps, resume)],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        signalled, ended, others = None, None, []
        metrics = run / "metrics.jsonl"
        start = metrics.read_bytes() if metrics.is_file() else b""
        rewound = not resume
        while proc.poll() is None:
            # Rows a resumed run will redo are still there until it has set them aside (or,
            # with none to set aside, appended a row of its own).
            rewound = rewound or (metrics.is_file() and metrics.read_bytes() != start)
            if signal_at and signalled is None and rewound:
                ranks = rank_processes(proc)
                if len(ranks) == 2 and max(rows(run), default=0) >= signal_at[0]:
                    kill = signal_at[1] == "kill"
                    targets, others = (ranks[1:], ranks[:1]) if kill else (ranks, ranks)
                    signalled = time.perf_counter()
                    for p in targets:
                        p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            if signalled and ended is None and not any(map(alive, others)):
                ended = time.perf_counter()
            time.sleep(0.05)
    if signalled and ended is None:
        ended = time.perf_counter()
    exit_s = ended - signalled if signalled else None
    return proc.returncode, exit_s, log.read_text()[-3000:]


def writer(name: str, rng: random.Random) -> int:
    """A rank that writes ``name``: rank 0 alone writes the trainer state and the marker."""
    return 0 if name in ("trainer_state.json", "COMPLETE") else rng.randint(0, 1)


def complete_steps(run: Path) -> list[int]:
    ckpts = (run / "checkpoints").glob("step*/COMPLETE")
    return sorted(int(p.parent.name[4:]) for p in ckpts)


def fault_chain(run: Path, steps: int, kinds: list[str], rng: random.Random) -> dict[str, Outcome]:
    """Resume after each fault of ``kinds``; the last segment runs to the end."""
    out = {k: Outcome() for k in KINDS}
    resume = False
    for kind in kinds:
        start = max(complete_steps(run), default=0)
        if start >= steps - 4:
            break
        at = rng.randint(start + 2, min(start + 5, steps - 2))
        save_at = -(-at // SAVE_EVERY) * SAVE_EVERY
        before = rows(run)
        o = out[kind]
        o.trials += 1
        if kind == KINDS[0]:
            code, exit_s, tail = segment(run, steps, resume, signal_at=(at, "term"))
            ok = code == PREEMPT_CODE
            if ok:  # the time to finish the step and checkpoint
                o.exit_s.append(exit_s or math.nan)
        elif kind == KINDS[1]:
            code, exit_s, tail = segment(run, steps, resume, signal_at=(at, "kill"))
            ok = code != 0
            o.exit_s.append(exit_s or math.nan)
        elif kind == KINDS[2]:
            name = rng.choice(SAVE_FILES)
            spec = f"kill:{rng.choice(['before', 'after'])}-{name}:{save_at}:{writer(name, rng)}"
            code, exit_s, tail = segment(run, steps, resume, faults=spec)
            ok = code != 0
            o.notes.append(spec)
        else:
            name = rng.choice(SAVE_FILES)
            spec = f"enospc:before-{name}:{save_at}:{writer(name, rng)}"
            code, exit_s, tail = segment(run, steps, resume, faults=spec)
            ok = code == 2 and "could not write checkpoint" in tail
            o.notes.append(spec)
        after, kept = rows(run), complete_steps(run)
        last_logged, resume_point = max(after, default=0), max(kept, default=0)
        o.steps_lost += max(last_logged - resume_point, 0)
        lost_rows = [
            s for s in before if s <= resume_point and not same_row(before[s], after.get(s))
        ]
        o.rows_lost += len(lost_rows)
        ok = ok and not lost_rows and resume_point >= start
        o.survived += int(ok)
        if not ok:
            o.notes.append(f"FAILED exit {code}: {tail[-400:]!r}")
        took = f", ranks ended {exit_s:.1f} s after the signal" if exit_s is not None else ""
        print(
            f"{kind} at step {at}: exit {code}{took}, resume point {resume_point}, "
            f"steps lost {max(last_logged - resume_point, 0)}, rows lost {len(lost_rows)}, "
            f"survived {ok}",
            flush=True,
        )
        resume = True
    code, _, tail = segment(run, steps, resume)
    if code != 0:
        raise SystemExit(f"the final segment failed (exit {code}):\n{tail}")
    return out


def nan_run(
    run: Path, steps: int, trials: int, rng: random.Random, ref: dict[int, dict]
) -> tuple[Outcome, float]:
    """One run with NaN losses at ``trials`` seeded steps on one rank each.

    Survived: that exact step skipped (an alert), no other. Returns the outcome and the largest
    train/loss difference from ``ref`` over the steps before the first skip.
    """
    at = sorted(rng.sample(range(3, steps), trials))
    spec = ",".join(f"nan:micro:{s}:{rng.randint(0, 1)}" for s in at)
    code, _, tail = segment(run, steps, False, faults=spec)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in lines if "skipped" in r.get("alert", "")]
    o = Outcome(trials=trials, survived=sum(s in skipped for s in at) if code == 0 else 0)
    o.steps_lost = len(skipped)
    o.notes.append(f"{spec}; skipped {skipped}; exit {code}")
    if skipped != at:
        o.survived = min(o.survived, trials - 1)
    got = rows(run)
    before = [s for s in ref if s < at[0]]
    diff = max((abs(ref[s]["train/loss"] - got[s]["train/loss"]) for s in before), default=0.0)
    final = abs(ref[steps]["train/loss"] - got[steps]["train/loss"]) if steps in got else math.inf
    o.notes.append(f"final train/loss {final:.3e} from the uninterrupted run's (steps skipped)")
    return o, diff


def loss_difference(ref: dict[int, dict], got: dict[int, dict]) -> float:
    """Largest |train/loss| difference over the steps both logged; inf if one is missing."""
    if sorted(ref) != sorted(got):
        return float("inf")
    return max(abs(ref[s]["train/loss"] - got[s]["train/loss"]) for s in ref)


def table(results: list[tuple[str, Outcome, float]]) -> str:
    lines = [
        "| fault | trials | survived | steps lost | rows lost | train/loss difference |",
        "|---|---|---|---|---|---|",
    ]
    for name, o, diff in results:
        lines.append(
            f"| {name} | {o.trials} | {o.survived} | {o.steps_lost} | {o.rows_lost} | {diff:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=20, help="faults in all (>= 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=64, help="trainer.max_steps of each run")
    parser.add_argument(
        "--docs", action="store_true", help="write the table to docs/reliability.md"
    )
    args = parser.parse_args()
    if args.faults < 5:
        parser.error("--faults must be >= 5 (one of each kind)")
    rng = random.Random(args.seed)
    n_nan = max(1, args.faults // 5)
    kinds = [KINDS[i % len(KINDS)] for i in range(args.faults - n_nan)]
    rng.shuffle(kinds)
    work = Path(tempfile.mkdtemp(prefix="moespec-chaos-"))
    print(f"runs under {work}", flush=True)
    started = time.perf_counter()
    code, _, tail = segment(work / "reference", args.steps, False)
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}):\n{tail}")
    ref = rows(work / "reference")
    chain = fault_chain(work / "chain", args.steps, kinds, rng)
    diff = loss_difference(ref, rows(work / "chain"))
    nan, nan_diff = nan_run(work / "nan", args.steps, n_nan, rng, ref)
    results = [(k, chain[k], diff) for k in KINDS] + [(NAN, nan, nan_diff)]
    text = table(results)
    term, kill = chain[KINDS[0]].exit_s, chain[KINDS[1]].exit_s
    extra = "".join([
        f"\nSIGTERM: both ranks finished the step, checkpointed and ended {min(term):.1f}-"
        f"{max(term):.1f} s after the signal." if term else "",
        f"\nSIGKILL of rank 1: rank 0 ended {min(kill):.1f}-{max(kill):.1f} s after the kill "
        f"(trainer.collective_timeout_s={TIMEOUT_S})." if kill else "",
    ])  # fmt: skip
    total = sum(o.trials for _, o, _ in results)
    footer = (
        f"{total} faults, {args.steps} steps per run, {time.perf_counter() - started:.0f} s in all."
    )
    print(text + extra + "\n" + footer)
    for name, o, _ in results:
        for note in o.notes:
            print(f"  {name}: {note}")
    if args.docs:
        write_docs(text + "\n\n" + extra.strip() + "\n\n" + footer, args)


def write_docs(text: str, args: argparse.Namespace) -> None:
    """Replace the table between the chaos markers of docs/reliability.md."""
    doc = ROOT / "docs" / "reliability.md"
    begin, end = "<!-- chaos:begin -->", "<!-- chaos:end -->"
    src = doc.read_text()
    head, rest = src.split(begin, 1)
    command = f"python scripts/chaos.py --faults {args.faults} --seed {args.seed} --steps {args.steps} --docs"
    body = f"{begin}\nMeasured with `{command}`:\n\n{text}\n"
    doc.write_text(head + body + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
