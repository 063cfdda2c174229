"""Step time of a tiny Qwen3-MoE trained with moespec's losses against transformers' own aux loss.

Both variants start from the same weights and run the same loop (forward, loss, backward,
AdamW step) on the same batches; rounds alternate between them and the medians are compared.
moespec: aux + orthogonality + variance through ``attach``; transformers:
``output_router_logits=True`` with ``router_aux_loss_coef``. Target ratio <= 1.10.
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
from moespec.models.hf_train import HFCausalLM, share_expert_pass  # noqa: E402
from moespec.paths import recipes_dir  # noqa: E402
from moespec.routing import LossConfig, clear_router_losses, collect_router_losses  # noqa: E402

CONFIG = recipes_dir() / "model" / "configs" / "qwen3_moe_tiny.json"
AUX = 0.01


def make_variant(base: torch.nn.Module, moespec: bool):
    """A training step closure over a copy of ``base``."""
    model = copy.deepcopy(base)
    if moespec:
        loss_cfg = LossConfig()
        loss_cfg.aux.weight = AUX
        loss_cfg.orthogonality.weight = "auto"
        loss_cfg.variance.weight = "auto"
        share_expert_pass(attach(model, loss_cfg))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = load_hf_model(config_path=CONFIG)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)
        for _ in range(args.steps)
    ]
    variants = {
        "transformers aux": make_variant(base, False),
        "moespec aux+orth+var": make_variant(base, True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up (and β/γ calibration)
        for b in batches[:2]:
            step(b[:, :-1], b[:, 1:])
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            for b in batches:
                variants[name](b[:, :-1], b[:, 1:])
            times[name].append((time.perf_counter() - t0) / len(batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["moespec aux+orth+var"] / med["transformers aux"]
    rows = [[k, f"{v * 1e3:.1f}", f"{v / med['transformers aux']:.3f}"] for k, v in med.items()]
    table = markdown_table(["variant", "median step (ms)", "ratio"], rows)
    verdict = "meets" if ratio <= 1.10 else "misses"
    body = (
        f"Tiny Qwen3-MoE ({CONFIG.name}), batch {args.batch} x {args.seq} tokens, AdamW step "
        f"included; {args.rounds} interleaved rounds of {args.steps} steps, medians.\n\n{table}\n\n"
        f"Ratio moespec / transformers: **{ratio:.3f}** ({verdict} the <= 1.10 target)."
    )
    print(body)
    if not args.no_write:
        print("wrote", write_section("bench_hf", body))


if __name__ == "__main__":
    main()
