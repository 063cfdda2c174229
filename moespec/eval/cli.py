"""``moespec-eval``: the evaluation sets of a recipe on a trained run or an exported model.

    moespec-eval runs/sft/specialization eval=synth
    moespec-eval runs/sft/specialization/hf_model eval=synth eval.sets.synth.max_examples=50
    deepspeed --num_gpus 2 --no_local_rank --module moespec.eval.cli RUN_DIR eval=synth

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..cli import check_overrides, fail, prepare_environment
from ..paths import recipes_dir

log = logging.getLogger("moespec")


MODEL_SOURCE_KEYS = ("model.name_or_path", "model.config", "model.upcycle_experts")


def recipe_of(target: Path, overrides: list[str]) -> tuple[list[str], Path | None]:
    """The overrides that rebuild ``target``'s model, and its checkpoint (None: an HF dir).

    An HF directory exported by a run (``RUN/hf_model``) is rebuilt with the run's recipe (its
    data, losses and MoE settings), the model taken from the directory as it is."""
    if (target / "config.json").is_file():
        source = [f"model.name_or_path={target}"]
        if (target.parent / ".hydra" / "overrides.yaml").is_file():
            run = [o for o in _run_overrides(target.parent) if _key(o) not in MODEL_SOURCE_KEYS]
            fixed = ["model.config=null", "model.upcycle_experts=0", "model.lora.enabled=false"]
            return [*run, *source, *fixed, *overrides], None
        return ["model=hf", *source, *overrides], None
    if not (target / ".hydra" / "overrides.yaml").is_file():
        raise FileNotFoundError(
            f"{target}: neither a run directory (no .hydra/overrides.yaml) nor a Hugging Face "
            "model directory (no config.json)"
        )
    from ..train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(target / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{target}: no complete checkpoint under checkpoints/")
    return [*_run_overrides(target), *overrides], ckpt


def _run_overrides(run_dir: Path) -> list[str]:
    saved = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    return [str(o) for o in saved if not _key(str(o)).startswith("hydra.")]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def results_dir(target: Path) -> Path:
    """Where ``moespec-eval`` writes: ``RUN/eval``, or ``<model dir>_eval`` beside an HF model
    directory (never inside the model)."""
    if (target / "config.json").is_file():
        return target.parent / f"{target.name}_eval"
    return target / "eval"


@dataclass
class LoadedModel:
    """A model rebuilt from a run directory or an HF directory, with its recipe, tokenizer and
    data (``None`` when not asked for and the tokenizer came from the model directory)."""

    cfg: Any
    tokenizer: Any
    data: Any
    model: Any
    step: int
    rank: int


def load_model(target: Path, overrides: list[str], *, with_data: bool = True) -> LoadedModel:
    """Rebuild ``target``'s model in a DeepSpeed engine and load its latest checkpoint
    (``target`` may also name one checkpoint, ``RUN/checkpoints/stepN``). An HF directory
    is evaluated with the tokenizer saved in it and labelled with the step it was exported at.

    A run trained expert parallel over more ranks than are running loads with
    ``moe.ep_size`` lowered to the number of processes (checkpoints hold experts by global id).
    A checkpoint that does not fit the recipe's model is a ``ValueError``.
    """
    import torch.distributed as dist

    from ..train.config import register_configs
    from ..train.trainer import (
        build_engine,
        build_run_data,
        data_tokenizer,
        init_distributed,
        validate_recipe,
    )

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
    tokenizer = data_tokenizer(cfg)
    if tokenizer is None and ckpt is None:
        raise ValueError(
            f"{target}: the model directory holds no tokenizer (tokenizer.json or "
            "tokenizer_config.json); save the model's tokenizer into it"
        )
    data = build_run_data(cfg, rank) if with_data or tokenizer is None else None
    tokenizer = data.tokenizer if data is not None else tokenizer
    engine, model, _ = build_engine(cfg, len(tokenizer))
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
    else:
        from ..models.hf_train import export_step

        step = export_step(target) or 0
    return LoadedModel(cfg, tokenizer, data, model, step, rank)


def run(target: Path, overrides: list[str]) -> dict[str, float]:
    """Evaluate every set of the composed recipe on ``target``; returns the figures."""
    import torch.distributed as dist

    from ..train.callbacks.eval_sets import format_table
    from .sets import evaluate_set, load_eval_set, validate_eval_config

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
