"""The GPU figures of moespec in one command, for a machine with one CUDA GPU.

Parts, each in its own process with its own time budget (a part that runs out is reported as
such and the next one starts):

- ``peak``: the GPU's bf16 matmul throughput (8192^3, median of 10 after 3 warm-ups), the
  denominator of every "share of peak" and MFU below;
- ``tests``: ``pytest -m gpu``;
- ``moe_layer``: ``scripts/bench_moe_layer.py`` at hidden 2048, 64 experts, top-8, 16k tokens,
  bf16 (moespec's layer, DeepSpeed's dispatch at EP=1, MegaBlocks where installed,
  transformers' ``grouped_mm`` and its other expert implementations, the roofline);
- ``hf``: ``scripts/bench_hf.py --config h2048`` in bf16: moespec aux only and aux +
  orthogonality + variance against transformers' own aux loss;
- ``sft_aux``, ``sft_spec``: ``moespec-train`` on a Qwen3-MoE of about 1.25B parameters built
  from a config (bf16, random weights, packed chat SFT rows of the shipped synthetic task),
  20 logged steps after warm-up, with ``loss=aux_only`` and ``loss=specialization``: tokens/s
  and model FLOP utilisation (6 x active parameters + attention, per token, over the peak).

A part whose package is missing (carry it with ``scripts/gpu_wheels.sh``) or that needs a GPU
where there is none is skipped with the reason. Prints one line per figure and writes
``gpu_check.md`` and ``gpu_check.json`` into ``--out`` (default ``$OUT``).

    bash scripts/gpu_check.sh            # on the GPU machine (installs carried wheels first)
    python scripts/gpu_check.py --only peak,tests --out /tmp/check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID_MODEL = dict(  # Qwen3-MoE, about 1.25B parameters, 0.19B active per token
    model_type="qwen3_moe", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
    moe_intermediate_size=512, num_hidden_layers=12, num_attention_heads=16,
    num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=2048, use_cache=False,
    tie_word_embeddings=False,
)  # fmt: skip
SFT_SEQ, SFT_BATCH, SFT_STEPS, SFT_WARMUP = 1024, 8, 30, 10
#: ``--smoke``: every part on the CPU at toy sizes, to check the commands before a lease
SMOKE_MODEL = {**MID_MODEL, "hidden_size": 64, "intermediate_size": 128,
               "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2}  # fmt: skip


@dataclass
class Part:
    """One figure-producing step: its command, its budget and what it needs."""

    name: str
    budget_s: int
    needs: tuple[str, ...] = ()
    gpu: bool = True
    lines: list[str] = field(default_factory=list)  # the table lines it printed
    status: str = "not run"
    seconds: float = 0.0


def parts(budget_scale: float = 1.0) -> list[Part]:
    """The check's parts in order, with budgets (seconds) summing to about 7 minutes."""
    spec = [
        ("peak", 30, ("torch",)),
        ("tests", 60, ("pytest", "deepspeed")),
        ("moe_layer", 120, ("deepspeed",)),
        ("hf", 90, ("transformers",)),
        ("sft_aux", 75, ("deepspeed", "hydra", "datasets", "omegaconf")),
        ("sft_spec", 75, ("deepspeed", "hydra", "datasets", "omegaconf")),
    ]
    return [Part(n, int(b * budget_scale), needs) for n, b, needs in spec]


def missing(part: Part) -> list[str]:
    """The modules ``part`` needs that this interpreter cannot import."""
    return [m for m in part.needs if importlib.util.find_spec(m) is None]


def skip_reason(part: Part, has_gpu: bool) -> str | None:
    """Why ``part`` cannot run here, or None."""
    if part.gpu and not has_gpu:
        return "skipped: no CUDA GPU"
    if gone := missing(part):
        return f"skipped: {', '.join(gone)} not installed (carry the wheels: scripts/gpu_wheels.sh)"
    return None


def command(part: Part, out: Path, peak_tflops: float, smoke: bool = False) -> list[str]:
    """The process that computes ``part`` (``peak`` runs inside this one); ``smoke``: on
    the CPU at toy sizes."""
    py = sys.executable
    gpu = ["--device", "cpu", "--dtype", "float32"] if smoke else ["--device", "cuda"]
    if part.name == "tests":
        return [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    if part.name == "moe_layer":
        size = "--hidden 2048 --ffn 768 --experts 64 --top-k 8 --tokens 16384 --rounds 5"
        if smoke:
            size = "--hidden 64 --ffn 32 --experts 8 --top-k 2 --tokens 256 --rounds 2"
        dtype = [] if smoke else ["--dtype", "bfloat16"]
        return [py, "scripts/bench_moe_layer.py", *gpu, *dtype, *size.split(),
                "--loss-rounds", size.split()[-1], "--peak-tflops", f"{peak_tflops:.1f}",
                "--no-write"]  # fmt: skip
    if part.name == "hf":
        size = "--config h2048 --batch 8 --seq 512 --rounds 3 --steps 3"
        if smoke:
            size = "--config tiny --batch 2 --seq 32 --rounds 1 --steps 1"
        dtype = [] if smoke else ["--dtype", "bfloat16"]
        return [py, "scripts/bench_hf.py", *gpu, *dtype, *size.split(), "--no-write"]
    seq, steps, batch, zero = (
        (128, 3, 2, "zero1") if smoke else (SFT_SEQ, SFT_STEPS, SFT_BATCH, "zero1_bf16")
    )
    loss = "aux_only" if part.name == "sft_aux" else "specialization"
    return [py, "-m", "moespec.train", "experiment=sft", "model=hf",
            f"model.config={out / 'mid_model.json'}", f"data.source={out / 'data/chat/train.jsonl'}",
            "data.val_fraction=0.05", f"data.seq_len={seq}", "data.vocab_size=4096",
            f"loss={loss}", f"deepspeed={zero}", f"deepspeed.micro_batch_size={batch}",
            f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=1000",
            "trainer.save_every=1000", "trainer.plot_every=1000", "trainer.progress=false",
            "eval=none", "wandb.enabled=false", f"hydra.run.dir={out / 'runs' / part.name}"]  # fmt: skip


def measure_peak() -> float:
    """bf16 TFLOP/s of an 8192^3 matmul on the current GPU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def flops_per_token(config: dict, seq: int) -> float:
    """Training FLOPs per token: 6 x active parameters (the k routed experts of each layer,
    attention, router, LM head) + the attention scores (6 x layers x seq x heads x head_dim)."""
    h, layers, k = config["hidden_size"], config["num_hidden_layers"], config["num_experts_per_tok"]
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    attention = h * d * (heads + 2 * kv) + heads * d * h
    experts = k * 3 * h * config["moe_intermediate_size"] + h * config["num_experts"]
    active = layers * (attention + experts) + h * config["vocab_size"]
    return 6 * active + 6 * layers * seq * heads * d


def sft_figures(out: Path, part: Part, peak_tflops: float, smoke: bool = False) -> list[str]:
    """Tokens/s (median over the logged steps after warm-up) and MFU of one SFT run."""
    warmup, model, seq = (1, SMOKE_MODEL, 128) if smoke else (SFT_WARMUP, MID_MODEL, SFT_SEQ)
    metrics = out / "runs" / part.name / "metrics.jsonl"
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    rates = [
        r["train/tokens_per_s"]
        for r in rows
        if r.get("step", 0) > warmup and "train/tokens_per_s" in r
    ]
    if not rates:
        return [f"{part.name}: no train/tokens_per_s logged after step {warmup}"]
    rate = statistics.median(rates)
    mfu = rate * flops_per_token(model, seq) / (peak_tflops * 1e12) if peak_tflops else 0.0
    return [f"{part.name}: {rate:,.0f} tokens/s, MFU {mfu:.1%} ({len(rates)} steps)"]


def prepare_sft(out: Path, smoke: bool = False) -> None:
    """The mid-size model's config and the synthetic chat data the SFT parts train on."""
    (out / "mid_model.json").write_text(json.dumps(SMOKE_MODEL if smoke else MID_MODEL, indent=1))
    if not (out / "data/chat/train.jsonl").is_file():
        from moespec.data.synth import write_task

        write_task(out / "data", train=6000, val=100, formats="chat")


def table_lines(stdout: str) -> list[str]:
    """The markdown table rows, the summary lines and pytest's count line a part printed."""
    keep = ("|", "MoELayer", "Orthogonality", "aux only", "aux+orth+var")
    counts = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected)\b")
    return [ln for ln in stdout.splitlines() if ln.strip().startswith(keep) or counts.search(ln)]


def run_part(
    part: Part, out: Path, peak_tflops: float, has_gpu: bool, smoke: bool = False
) -> float:
    """Run ``part`` within its budget; fills its lines and status; the peak when it is ``peak``."""
    reason = skip_reason(part, has_gpu or (smoke and part.name != "peak"))
    if reason:
        part.status, part.lines = reason, [f"{part.name}: {reason}"]
        return peak_tflops
    start = time.perf_counter()
    if part.name == "peak":
        peak_tflops = measure_peak()
        part.status, part.lines = "ok", [f"peak: bf16 matmul {peak_tflops:.0f} TFLOP/s"]
    else:
        if part.name.startswith("sft"):
            prepare_sft(out, smoke)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
        try:
            proc = subprocess.run(command(part, out, peak_tflops, smoke), cwd=ROOT, env=env, text=True,
                                  capture_output=True, timeout=part.budget_s)  # fmt: skip
            (out / f"{part.name}.log").write_text(proc.stdout + proc.stderr)
            part.status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            part.lines = table_lines(proc.stdout)
            if part.name.startswith("sft") and proc.returncode == 0:
                part.lines = sft_figures(out, part, peak_tflops, smoke)
            if proc.returncode:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                part.lines.append(f"{part.name}: {part.status}: {tail[0][:300]}")
        except subprocess.TimeoutExpired:
            part.status = f"timed out after {part.budget_s} s"
            part.lines = [f"{part.name}: {part.status}"]
    part.seconds = time.perf_counter() - start
    return peak_tflops


def report(parts_run: list[Part], device: str) -> str:
    """The markdown the check writes: one section per part."""
    out = [f"# GPU check\n\nDevice: {device}\n"]
    for p in parts_run:
        out += [f"## {p.name} ({p.status}, {p.seconds:.0f} s)", "", *p.lines, ""]
    return "\n".join(out)


def device_line() -> str:
    import torch

    versions = f"torch {torch.__version__}, Python {sys.version.split()[0]}"
    if not torch.cuda.is_available():
        return f"no CUDA GPU; {versions}"
    return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, {versions}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--only", default="", help="comma-separated parts (default: all)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every budget")
    p.add_argument("--smoke", action="store_true", help="every part but peak on the CPU, tiny")
    args = p.parse_args(argv)
    todo = parts(args.budget_scale)
    names = [x.name for x in todo]
    only = [n for n in args.only.split(",") if n]
    if unknown := [n for n in only if n not in names]:
        p.error(f"unknown parts {unknown}; valid: {', '.join(names)}")
    todo = [x for x in todo if not only or x.name in only]
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    has_gpu, peak = torch.cuda.is_available(), 0.0
    device = device_line()
    print(f"device: {device}", flush=True)
    for part in todo:
        peak = run_part(part, args.out, peak, has_gpu, args.smoke)
        for line in part.lines:
            print(line, flush=True)
    (args.out / "gpu_check.md").write_text(report(todo, device))
    results = {x.name: {"status": x.status, "seconds": x.seconds, "lines": x.lines} for x in todo}
    (args.out / "gpu_check.json").write_text(
        json.dumps({"device": device, "parts": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
