"""Step time of a Qwen3-MoE trained with moespec's losses against transformers' own aux loss.

All variants start from the same weights and run the same loop (forward, loss, backward,
AdamW step) on the same batches; rounds alternate between them and the medians are compared.
moespec (``attach``, experts through its experts implementation): aux only, aux + variance,
aux + orthogonality + variance; transformers: ``output_router_logits=True`` with
``router_aux_loss_coef``. Targets against transformers' aux: aux only <= 1.02, aux +
orthogonality + variance <= 1.05. ``--config`` picks the size (``tiny``: the recipe's
qwen3_moe_tiny.json; ``h512``: hidden 512, 32 experts, top-4, expert FFN 256; ``h1024``:
hidden 1024, 64 experts, top-8, expert FFN 256; ``h2048``: hidden 2048, the same experts);
``--device cuda --dtype bfloat16`` for a GPU; ``--profile`` prints where a step's time goes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, write_section  # noqa: E402

from moespec.models.hf import attach, load_hf_model  # noqa: E402
from moespec.models.hf_train import HFCausalLM  # noqa: E402
from moespec.paths import recipes_dir  # noqa: E402
from moespec.routing import LossConfig, clear_router_losses, collect_router_losses  # noqa: E402

CONFIG = recipes_dir() / "model" / "configs" / "qwen3_moe_tiny.json"
AUX = 0.01
_SIZES = {
    "h512": dict(hidden_size=512, num_experts=32, num_experts_per_tok=4),
    "h1024": dict(hidden_size=1024, num_experts=64, num_experts_per_tok=8),
    "h2048": dict(hidden_size=2048, num_experts=64, num_experts_per_tok=8),
}
VARIANTS = {  # name: (orthogonality weight, variance weight); None: transformers' own aux
    "transformers aux": None,
    "moespec aux": (0.0, 0.0),
    "moespec aux+var": (0.0, "auto"),
    "moespec aux+orth+var": ("auto", "auto"),
}


def make_base(name: str) -> torch.nn.Module:
    """The benchmark model: the tiny recipe config or a realistic-proportion Qwen3-MoE."""
    if name == "tiny":
        return load_hf_model(config_path=CONFIG)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=4096,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        moe_intermediate_size=256,
        intermediate_size=1024,
        norm_topk_prob=True,
        **_SIZES[name],
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_variant(base: torch.nn.Module, weights: tuple | None):
    """A training step closure over a copy of ``base``."""
    model = copy.deepcopy(base)
    moespec = weights is not None
    if moespec:
        loss_cfg = LossConfig()
        loss_cfg.aux.weight = AUX
        loss_cfg.orthogonality.weight, loss_cfg.variance.weight = weights
        attach(model, loss_cfg)
    else:
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = AUX
    wrapper = HFCausalLM(model).train()
    opt = torch.optim.AdamW(wrapper.parameters(), lr=1e-3)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        out = wrapper(ids, labels)
        loss = out.loss
        if moespec:
            loss = loss + collect_router_losses(wrapper).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if moespec:
            clear_router_losses(wrapper)
        return float(loss.detach())

    return step


def paired_ratio(times: list[float], ref: list[float]) -> tuple[float, float, float]:
    """Quartiles (25%, 50%, 75%) of the per-round ratios ``times[r] / ref[r]``."""
    ratios = [t / r for t, r in zip(times, ref, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


def profile(step, batch: torch.Tensor, rows: int = 12) -> None:
    """Print the ops that take a step's time (CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch[:, :-1], batch[:, 1:])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", *_SIZES], default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    parser.add_argument("--profile", action="store_true", help="profile one step of each variant")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is "
        "steadier on a machine that shares its cores",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = make_base(args.config).to(args.device, getattr(torch, args.dtype))
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen).to(args.device)
        for _ in range(args.steps)
    ]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    variants = {name: make_variant(base, w) for name, w in VARIANTS.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up (and β/γ calibration)
        for b in batches[:2]:
            step(b[:, :-1], b[:, 1:])
    if args.profile:
        for name, step in variants.items():
            print(f"== {name}")
            profile(step, batches[0])
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            sync()
            t0 = time.perf_counter()
            for b in batches:
                variants[name](b[:, :-1], b[:, 1:])
            sync()
            times[name].append((time.perf_counter() - t0) / len(batches))
    ref_times = times["transformers aux"]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: paired_ratio(v, ref_times) for k, v in times.items()}
    rows = [
        [k, f"{med[k] * 1e3:.1f}", f"{r[1]:.3f}", f"{r[0]:.3f} – {r[2]:.3f}"]
        for k, r in ratio.items()
    ]
    table = markdown_table(["variant", "median step (ms)", "ratio", "ratio IQR"], rows)
    aux, full = ratio["moespec aux"][1], ratio["moespec aux+orth+var"][1]
    verdict = [
        f"aux only **{aux:.3f}** ({'meets' if aux <= 1.02 else 'misses'} <= 1.02)",
        f"aux+orth+var **{full:.3f}** ({'meets' if full <= 1.05 else 'misses'} <= 1.05)",
    ]
    body = (
        f"Qwen3-MoE `{args.config}`, {args.dtype} on {args.device}, batch {args.batch} x "
        f"{args.seq} tokens, AdamW "
        f"step included; {args.rounds} interleaved rounds of {args.steps} steps. The ratio is "
        "the median over rounds of each round's step time over transformers' in the same "
        "round (paired, so drift in the machine's speed cancels); IQR: its quartiles.\n\n"
        f"{table}\n\nRatios against transformers' own aux: {'; '.join(verdict)}."
    )
    print(body)
    if not args.no_write:
        print(
            "wrote",
            write_section("bench_hf" + ("" if args.config == "tiny" else f"_{args.config}"), body),
        )


if __name__ == "__main__":
    main()
