"""``moespec-eval``: the evaluation sets of a recipe on a trained run or an exported model.

    moespec-eval runs/sft/specialization eval=synth
    moespec-eval runs/sft/specialization/hf_model eval=synth eval.sets.synth.max_examples=50
    deepspeed --num_gpus 2 --no_local_rank --module moespec.eval.cli RUN_DIR eval=synth

A run directory is rebuilt from its recipe (``.hydra/overrides.yaml`` plus the overrides given
here) and its latest complete checkpoint; a directory with ``config.json`` is loaded as a
Hugging Face model. Figures are printed as a table and written to ``<out>/eval/results_step<N>.json``
with every prediction in ``<out>/eval/<set>/step<N>.jsonl``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..cli import check_overrides, fail
from ..paths import recipes_dir

log = logging.getLogger("moespec")


def recipe_of(target: Path, overrides: list[str]) -> tuple[list[str], Path | None]:
    """The overrides that rebuild ``target``'s model, and its checkpoint (None: an HF dir)."""
    if (target / "config.json").is_file():
        return ["model=hf", f"model.name_or_path={target}", *overrides], None
    saved = target / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise FileNotFoundError(
            f"{target}: neither a run directory (no .hydra/overrides.yaml) nor a Hugging Face "
            "model directory (no config.json)"
        )
    from ..train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(target / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{target}: no complete checkpoint under checkpoints/")
    keep = [str(o) for o in OmegaConf.load(saved) if not str(o).lstrip("+~").startswith("hydra.")]
    return [*keep, *overrides], ckpt


@dataclass
class LoadedModel:
    """A model rebuilt from a run directory or an HF directory, with its recipe and data."""

    cfg: Any
    data: Any
    model: Any
    step: int
    rank: int


def load_model(target: Path, overrides: list[str]) -> LoadedModel:
    """Rebuild ``target``'s model in a DeepSpeed engine and load its latest checkpoint
    (``target`` may also name one checkpoint, ``RUN/checkpoints/stepN``).

    A run trained expert parallel over more ranks than are running loads with
    ``moe.ep_size`` lowered to the number of processes (checkpoints hold experts by global id).
    A checkpoint that does not fit the recipe's model is a ``ValueError``.
    """
    import torch.distributed as dist

    from ..train.config import register_configs
    from ..train.trainer import build_engine, build_run_data, init_distributed, validate_recipe

    register_configs()
    chosen = None
    if target.parent.name == "checkpoints":  # one checkpoint of a run: RUN/checkpoints/stepN
        target, chosen = target.parents[1], target
    args, ckpt = recipe_of(target, overrides)
    ckpt = chosen or ckpt
    rank, world = init_distributed()
    cfg = OmegaConf.to_object(check_overrides(args, recipes_dir(), "train"))
    if cfg.moe.ep_size > world and dist.is_initialized():
        args.append(f"moe.ep_size={world}")
        cfg = OmegaConf.to_object(check_overrides(args, recipes_dir(), "train"))
    validate_recipe(cfg)
    data = build_run_data(cfg, rank)
    engine, model, _ = build_engine(cfg, len(data.tokenizer))
    step = 0
    if ckpt is not None:
        try:
            engine.load_checkpoint(
                str(ckpt.parent), tag=ckpt.name, load_optimizer_states=False,
                load_lr_scheduler_states=False,
            )  # fmt: skip
        except RuntimeError as err:
            first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
            raise ValueError(
                f"{ckpt}: the checkpoint does not fit the model of {target}'s recipe ({first})"
            ) from None
        step = int(ckpt.name.removeprefix("step"))
    return LoadedModel(cfg, data, model, step, rank)


def run(target: Path, overrides: list[str]) -> dict[str, float]:
    """Evaluate every set of the composed recipe on ``target``; returns the figures."""
    import torch.distributed as dist

    from ..train.callbacks.eval_sets import format_table
    from .sets import evaluate_set, load_eval_set, validate_eval_config

    loaded = load_model(target, overrides)
    cfg, data, model, step, rank = (
        loaded.cfg, loaded.data, loaded.model, loaded.step, loaded.rank
    )  # fmt: skip
    configs = validate_eval_config(cfg.eval)
    if not configs:
        raise ValueError("no evaluation set: give eval=<recipe> or +eval.sets.<name>.source=FILE")
    out_dir = target / "eval"
    device = next(model.parameters()).device
    figures: dict[str, float] = {}
    for name, set_cfg in configs.items():
        es = load_eval_set(name, set_cfg, cfg.data, data.tokenizer)
        figures.update(
            evaluate_set(model, es, data.tokenizer, device, out_dir if rank == 0 else None, step)
        )
    if rank == 0:
        print(format_table(figures))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"results_step{step:06d}.json").write_text(json.dumps(figures, indent=1))
    if dist.is_initialized():
        dist.barrier()
    return figures


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``moespec-eval TARGET [OVERRIDES...]``; bad input exits 2."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args else 2)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    try:
        run(Path(args[0]), args[1:])
    except (ValueError, FileNotFoundError) as err:
        fail(err)


if __name__ == "__main__":
    main()
