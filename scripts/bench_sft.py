"""SFT packing: `data.packing=true` vs `data.packing=false` on the shipped instruction task.

The task is written by `moespec.data.synth.write_task` into a temporary directory and read as
`experiment=sft data.source=<task>/prompt_completion/train.jsonl` with moespec's tiny MoE model.
For each setting the rows of `build_data(cfg.data)` give the padding share (positions with
`attention_mask` 0) and the trained share (labels other than -100). Throughput is measured in
one process on the trainer's own engine and `Trainer.train_step`, timed as `Trainer.fit` times
a step (batch fetch included, no callbacks, no eval or checkpoint): the two settings alternate
over several rounds of a fixed number of optimizer steps, medians over rounds. Writes the
`SFT packing (scripts/bench_sft.py)` section of docs/benchmarks.md.

    python scripts/bench_sft.py [--rounds 9] [--steps 10] [--threads 1] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchlib import markdown_table, write_section
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moespec.data.build import build_data
from moespec.data.synth import write_task
from moespec.paths import recipes_dir
from moespec.routing import iter_routers
from moespec.train.builders import build_engine
from moespec.train.config import TrainConfig, register_configs
from moespec.train.launch import init_distributed
from moespec.train.trainer import Trainer

SECTION = "SFT packing (scripts/bench_sft.py)"


@dataclass
class Setting:
    name: str
    trainer: Trainer
    rows: int
    examples: str  # kept of the training split's examples (too long ones are dropped)
    padding: float  # share of row positions that are padding
    trained: float  # share of row positions with a trained label
    seconds: list[float]  # per round: training-step time of `steps` optimizer steps
    cpu: list[float]  # per round: process CPU time of those steps
    positions: list[int]  # per round: all positions of those steps
    real: list[int]  # per round: non-padding positions
    labels: list[int]  # per round: trained (non -100) labels


def compose_cfg(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


def row_counts(rows: Any) -> tuple[int, int, int]:
    """(all positions, non-padding positions, trained labels) over every row of ``rows``."""
    total = real = trained = 0
    for i in range(len(rows)):
        item = rows[i]
        total += item["attention_mask"].numel()
        real += int(item["attention_mask"].sum())
        trained += int((item["labels"] != -100).sum())
    return total, real, trained


def setup(name: str, packing: bool, args: argparse.Namespace, task: Path, tmp: Path) -> Setting:
    cfg = compose_cfg([
        "experiment=sft", f"data.source={task / 'prompt_completion' / 'train.jsonl'}",
        f"data.seq_len={args.seq_len}", f"model.tiny.max_seq_len={args.seq_len}",
        f"data.packing={str(packing).lower()}", f"data.cache_dir={tmp / 'cache'}",
        f"trainer.max_steps={args.warmup + args.rounds * args.steps}", "wandb.enabled=false",
    ])  # fmt: skip
    data = build_data(cfg.data, rank=0)
    total, real, trained = row_counts(data.train)
    engine, model, scheduler = build_engine(cfg, len(data.tokenizer))
    trainer = Trainer(cfg, tmp / name, engine, model, data, scheduler, 0, 1, callbacks=[])
    for r in iter_routers(model):  # as in moespec.train.trainer.train
        r.defer_bias_update = True
    st = data.train.stats
    kept = f"{st.kept} of {st.examples}"
    return Setting(
        name, trainer, len(data.train), kept, 1 - real / total, trained / total, [], [], [], [], []
    )


def run_steps(s: Setting, steps: int) -> tuple[float, float, int, int, int]:
    """Wall and CPU time, (all, non-padding, trained) positions of ``steps`` optimizer steps."""
    t, gas = s.trainer, s.trainer.cfg.deepspeed.gradient_accumulation_steps
    seconds, positions, real, labels = 0.0, 0, 0, 0
    cpu = time.process_time()
    for _ in range(steps):
        t.step += 1
        started = time.perf_counter()
        batches = [next(t.batches) for _ in range(gas)]
        t.train_step(batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        for b in batches:
            positions += b["attention_mask"].numel()
            real += int(b["attention_mask"].sum())
            labels += int((b["labels"] != -100).sum())
    return seconds, time.process_time() - cpu, positions, real, labels


def rate(s: Setting, counts: list[int], r: int) -> float:
    return counts[r] / s.seconds[r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train", type=int, default=1000, help="training examples of the task")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_task(tmp / "task", train=args.train, formats="prompt_completion")
        cases = [
            setup("packed (data.packing=true)", True, args, tmp / "task", tmp),
            setup("padded (data.packing=false)", False, args, tmp / "task", tmp),
        ]
        for s in cases:
            run_steps(s, args.warmup)
        for r in range(args.rounds):
            for s in cases if r % 2 == 0 else cases[::-1]:
                sec, cpu, pos, real, labels = run_steps(s, args.steps)
                s.seconds.append(sec)
                s.cpu.append(cpu)
                s.positions.append(pos)
                s.real.append(real)
                s.labels.append(labels)
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{s.name} {s.labels[-1] / s.seconds[-1]:.0f} trained tok/s" for s in cases),
                flush=True,
            )  # fmt: skip
    rows = []
    for s in cases:
        rounds = range(len(s.seconds))
        rows.append([
            s.name, s.examples, s.rows, f"{s.padding * 100:.1f}%", f"{s.trained * 100:.1f}%",
            f"{statistics.median(1000 * x / args.steps for x in s.seconds):.1f}",
            f"{statistics.median(1000 * x / args.steps for x in s.cpu):.1f}",
            f"{statistics.median(rate(s, s.positions, r) for r in rounds):.0f}",
            f"{statistics.median(rate(s, s.real, r) for r in rounds):.0f}",
            f"{statistics.median(rate(s, s.labels, r) for r in rounds):.0f}",
        ])  # fmt: skip
    packed, padded = cases
    n = range(args.rounds)
    ratio_real = statistics.median(
        rate(packed, packed.real, r) / rate(padded, padded.real, r) for r in n
    )
    per_round = [rate(packed, packed.labels, r) / rate(padded, padded.labels, r) for r in n]
    ratio_trained = statistics.median(per_round)
    q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [ratio_trained] * 3
    ratio_step = statistics.median(packed.seconds[r] / padded.seconds[r] for r in n)
    cpu_trained = statistics.median(
        (packed.labels[r] / packed.cpu[r]) / (padded.labels[r] / padded.cpu[r]) for r in n
    )
    header = [
        "setting", "examples", "rows", "padding share", "trained share", "step (ms)", "step CPU (ms)",
        "tokens/s (all positions)", "real tokens/s (non-padding)", "trained tokens/s (labels)",
    ]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    summary = (
        f"Packed / padded, median of per-round ratios: **{ratio_real:.2f}x** real (non-padding) "
        f"tokens/s, **{ratio_trained:.2f}x** trained tokens/s (IQR {q1:.2f}-{q3:.2f}); step time "
        f"ratio {ratio_step:.2f}. On process CPU time instead of wall time: **{cpu_trained:.2f}x** "
        "trained tokens/s."
    )
    print(summary)
    cfg = packed.trainer.cfg
    body = (
        f"Shipped instruction task (`write_task`, {args.train} training examples, prompt/completion "
        f"form; `data.val_fraction={cfg.data.val_fraction}` of it held out), `experiment=sft "
        f"data.seq_len={args.seq_len}`: tiny MoE model (hidden "
        f"{cfg.model.tiny.hidden_size}, {cfg.model.tiny.num_layers} layers, {cfg.moe.num_experts} "
        f"experts, top-{cfg.moe.top_k}), {cfg.data.vocab_size}-token BPE, micro batch "
        f"{cfg.deepspeed.micro_batch_size}, loss on completions only. Padding and trained shares "
        f"are over all rows of the training split; throughput counts the batches trained. One "
        f"process, {args.rounds} alternating rounds of {args.steps} optimizer steps per setting "
        f"after {args.warmup} warm-up steps; step time as `Trainer.fit` measures it (batch fetch, "
        f"forward, routing losses, backward, optimizer step), medians over rounds; "
        f"{args.threads} torch thread(s), so process CPU time is also shown (less sensitive than "
        f"wall time to other load on the machine).\n\n"
        f"{table}\n\n{summary}"
    )
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
