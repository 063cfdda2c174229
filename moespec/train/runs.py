"""A run directory (or an exported model directory) rebuilt: its recipe, tokenizer, data and
model with the latest checkpoint (:func:`load_model`), for ``moespec-eval`` and
``moespec-report``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..cli import check_overrides, override_key
from ..paths import recipes_dir

MODEL_SOURCE_KEYS = ("model.name_or_path", "model.config", "model.upcycle_experts")


def recipe_of(target: Path, overrides: list[str]) -> tuple[list[str], Path | None]:
    """The overrides that rebuild ``target``'s model, and its checkpoint (None: an HF dir).

    An HF directory exported by a run (``RUN/hf_model``) is rebuilt with the run's recipe (its
    data, losses and MoE settings), the model taken from the directory as it is."""
    if (target / "config.json").is_file():
        source = [f"model.name_or_path={target}"]
        if (target.parent / ".hydra" / "overrides.yaml").is_file():
            run = [
                o for o in _run_overrides(target.parent) if override_key(o) not in MODEL_SOURCE_KEYS
            ]
            fixed = ["model.config=null", "model.upcycle_experts=0", "model.lora.enabled=false"]
            return [*run, *source, *fixed, *overrides], None
        return ["model=hf", *source, *overrides], None
    if not (target / ".hydra" / "overrides.yaml").is_file():
        raise FileNotFoundError(
            f"{target}: neither a run directory (no .hydra/overrides.yaml) nor a Hugging Face "
            "model directory (no config.json)"
        )
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(target / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{target}: no complete checkpoint under checkpoints/")
    return [*_run_overrides(target), *overrides], ckpt


def _run_overrides(run_dir: Path) -> list[str]:
    saved = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    return [str(o) for o in saved if not override_key(str(o)).startswith("hydra.")]


def results_dir(target: Path) -> Path:
    """Where ``moespec-eval`` writes: ``RUN/eval`` (for the run or one of its checkpoints,
    ``RUN/checkpoints/stepN``), or ``<model dir>_eval`` beside an HF model directory (never
    inside the model)."""
    if (target / "config.json").is_file():
        return target.parent / f"{target.name}_eval"
    if target.parent.name == "checkpoints":
        return target.parents[1] / "eval"
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

    from .builders import build_engine, build_run_data, data_tokenizer, validate_recipe
    from .config import register_configs
    from .launch import init_distributed

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
