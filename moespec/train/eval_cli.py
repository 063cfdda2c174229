"""``moespec-eval``: the evaluation sets of a recipe on a trained run or an exported model.

    moespec-eval runs/sft/specialization eval=synth
    moespec-eval runs/sft/specialization/hf_model eval=synth eval.sets.synth.max_examples=50
    deepspeed --num_gpus 2 --no_local_rank --module moespec.train.eval_cli RUN_DIR eval=synth

A run directory is rebuilt from its recipe (``.hydra/overrides.yaml`` plus the overrides given
here) and its latest complete checkpoint; a directory with ``config.json`` is loaded as a
Hugging Face model with the tokenizer saved in it (an export ``RUN/hf_model`` with its run's
recipe, labelled with the step it was exported at). Figures are printed as a table and written
to ``RUN/eval/results_step<N>.json`` (``<model dir>_eval/`` beside an HF directory), with every
prediction in ``<set>/step<N>.jsonl`` there.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..cli import fail, prepare_environment
from .runs import load_model, results_dir

log = logging.getLogger("moespec")


def run(target: Path, overrides: list[str]) -> dict[str, float]:
    """Evaluate every set of the composed recipe on ``target``; returns the figures."""
    import torch.distributed as dist

    from ..eval.sets import evaluate_set, load_eval_set, validate_eval_config
    from .callbacks.eval_sets import format_table

    loaded = load_model(target, overrides, with_data=False)
    cfg, tok, model, step, rank = (
        loaded.cfg, loaded.tokenizer, loaded.model, loaded.step, loaded.rank
    )  # fmt: skip
    configs = validate_eval_config(cfg.eval)
    if not configs:
        raise ValueError("no evaluation set: give eval=<recipe> or +eval.sets.<name>.source=FILE")
    out_dir = results_dir(target)
    device = next(model.parameters()).device
    figures: dict[str, float] = {}
    for name, set_cfg in configs.items():
        es = load_eval_set(name, set_cfg, cfg.data, tok)
        figures.update(evaluate_set(model, es, tok, device, out_dir if rank == 0 else None, step))
    if rank == 0:
        print(format_table(figures))
        out_dir.mkdir(parents=True, exist_ok=True)
        results = out_dir / f"results_step{step:06d}.json"
        results.write_text(json.dumps(figures, indent=1))
        print(f"results of step {step}: {results} (predictions: {out_dir}/<set>/)")
    if dist.is_initialized():
        dist.barrier()
    return figures


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``moespec-eval TARGET [OVERRIDES...]``; bad input exits 2."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args else 2)
    prepare_environment()
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    try:
        run(Path(args[0]), args[1:])
    except (ValueError, FileNotFoundError) as err:
        fail(err)


if __name__ == "__main__":
    main()
