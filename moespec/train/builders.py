"""From a recipe to what the loop runs: checks before anything is built, the model, the
optimizer groups and schedule, the DeepSpeed config and engine, and the run's data."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from ..data.build import build_data
from ..data.pipeline import DataBundle, validate_data_config
from ..distributed import local_device
from ..eval.sets import validate_eval_config
from ..moe.config import AUTOEP
from ..routing import iter_routers, validate_loss_config
from . import checkpoint as ckpt
from . import faults
from .config import TrainConfig
from .zero3 import register_leaf_blocks, zero3_problem


class TrainingError(RuntimeError):
    """A run that cannot go on (bad input, non-finite loss); the message is one line."""


def validate_recipe(cfg: TrainConfig) -> None:
    """Every check that needs no data, model weights or processes: bad input fails at once."""
    cfg.moe.validate(own_experts=cfg.model.type != "hf")
    validate_loss_config(cfg.loss)
    cfg.optim.validate()
    cfg.trainer.validate()
    faults.parse(os.environ.get(faults.ENV, ""))
    if cfg.trainer.nonfinite == "skip" and cfg.deepspeed.zero_stage == 0:
        raise TrainingError(
            "trainer.nonfinite=skip needs deepspeed.zero_stage >= 1 (its optimizer drops a step "
            "with non-finite gradients); got deepspeed.zero_stage=0"
        )
    if cfg.trainer.resume not in ("none", "auto", ""):
        ckpt.resolve_resume(cfg.trainer.resume, Path())  # an explicit checkpoint must exist
    deepspeed_config(cfg)
    validate_data_config(cfg.data)
    validate_eval_config(cfg.eval)
    if cfg.model.type == "hf":
        from ..models.hf_train import check_model_source

        check_model_source(cfg)
        if cfg.model.lora.enabled and cfg.moe.backend == "deepspeed" and cfg.deepspeed.zero_stage:
            raise TrainingError(
                f"model.lora.enabled=true with moe.backend=deepspeed needs deepspeed=zero0 (got "
                f"zero_stage={cfg.deepspeed.zero_stage}): LoRA freezes the experts, and "
                "DeepSpeed's ZeRO optimizer refuses expert-parallel layers without trainable "
                "expert weights; LoRA's optimizer state is small, so ZeRO saves little"
            )
    elif cfg.model.type != "tiny":
        raise TrainingError(f"model.type={cfg.model.type!r}; valid: tiny, hf")


def refuse_ignored_keys(cfg: TrainConfig, overrides: list[str]) -> None:
    """Command-line keys the recipe's model would ignore are an error naming the key to use."""
    if cfg.model.type == "hf":
        from ..models.hf_train import refuse_unused_moe_keys

        refuse_unused_moe_keys(cfg, overrides)


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The model of ``cfg.model`` with the MoE backend and losses of ``cfg`` (activation
    checkpointing on with ``trainer.activation_checkpointing``)."""
    model = _build_model(cfg, vocab_size)
    if cfg.trainer.activation_checkpointing:
        from ..models.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    return model


def _build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    if cfg.model.type == "tiny":
        from ..models.tiny import TinyMoEConfig, TinyMoELM

        if cfg.moe.backend == AUTOEP:
            raise TrainingError(
                "moe.backend=autoep converts Hugging Face MoE blocks (model=hf); the tiny LM "
                "runs expert parallel with moe.backend=deepspeed"
            )
        tiny = TinyMoEConfig(**{**asdict(cfg.model.tiny), "vocab_size": vocab_size})
        if tiny.max_seq_len < cfg.data.seq_len:
            tiny.max_seq_len = cfg.data.seq_len
        return TinyMoELM(tiny, cfg.moe, cfg.loss)
    if cfg.model.type == "hf":
        from ..models.hf_train import build_hf_model

        return build_hf_model(cfg, vocab_size)
    raise TrainingError(f"model.type={cfg.model.type!r}; valid: tiny, hf")


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for norms, biases and routers; MoE params split out for DeepSpeed."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    gates = {id(r.weight) for r in iter_routers(model)}  # HF gates are named "...mlp.gate"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "norm" in name or id(p) in gates:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config of the recipe."""
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise TrainingError(f"deepspeed.zero_stage={ds.zero_stage}; valid: 0, 1, 2, 3")
    if ds.zero_stage == 3 and (problem := zero3_problem(cfg)):
        raise TrainingError(problem)
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        if getattr(ds, name) < 1:
            raise TrainingError(f"deepspeed.{name} must be >= 1, got {getattr(ds, name)}")
    if ds.gradient_clipping < 0:
        raise TrainingError(f"deepspeed.gradient_clipping must be >= 0, got {ds.gradient_clipping}")
    if ds.precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"deepspeed.precision={ds.precision!r}; valid: fp32, bf16, fp16")
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 12},
    }
    extra = (
        OmegaConf.to_container(ds.extra, resolve=True)
        if OmegaConf.is_config(ds.extra)
        else dict(ds.extra)
    )
    conf.update(extra)
    return conf


def check_data_sizes(cfg: TrainConfig, data: DataBundle, world: int) -> None:
    """Both splits hold at least one global batch (``TrainingError`` naming what to change)."""
    micro = cfg.deepspeed.micro_batch_size
    if len(data.train) < micro * world:
        raise TrainingError(
            f"only {len(data.train)} training sequences for {world} rank(s) × micro batch {micro}; "
            "lower deepspeed.micro_batch_size or data.seq_len"
        )
    if len(data.val) < micro * world:
        raise TrainingError(
            f"the validation split has {len(data.val)} sequence(s), fewer than one batch of "
            f"{world} rank(s) × micro batch {micro} for evaluation; raise data.val_fraction "
            f"(now {cfg.data.val_fraction}), or lower deepspeed.micro_batch_size or data.seq_len"
        )


def check_run_data(cfg: TrainConfig, world: int) -> None:
    """``--check``: read, tokenize, split and pack the recipe's own data files as the run will
    (into the same cache, so the run reuses the work) and check the split sizes. The embedded
    corpus is not read here."""
    if cfg.data.source == "embedded":
        return
    check_data_sizes(cfg, build_data(cfg.data, rank=0, tokenizer=data_tokenizer(cfg)), world)


def data_tokenizer(cfg: TrainConfig) -> Any:
    """The HF model's own tokenizer when its directory has one, else ``None`` (the data's own)."""
    if cfg.model.type != "hf":
        return None
    from ..models.hf_train import hf_data_tokenizer

    return hf_data_tokenizer(cfg)


def build_run_data(cfg: TrainConfig, rank: int) -> DataBundle:
    """Rank 0 builds the data cache, the others read it after the barrier."""
    hf_tok = data_tokenizer(cfg)
    data = build_data(cfg.data, rank=0, tokenizer=hf_tok) if rank == 0 else None
    dist.barrier()
    return data if data is not None else build_data(cfg.data, rank=rank, tokenizer=hf_tok)


def build_engine(
    cfg: TrainConfig, vocab: int, *, load_universal: bool = False
) -> tuple[Any, nn.Module, Any]:
    """Model, AdamW with warmup-cosine, and the DeepSpeed engine around them
    (``load_universal``: it will load a checkpoint in DeepSpeed's universal format)."""
    import deepspeed

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, vocab).to(local_device())
    if cfg.deepspeed.zero_stage == 3:
        register_leaf_blocks(model)
    config = deepspeed_config(cfg)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    if cfg.moe.backend == AUTOEP:
        return _autoep_engine(cfg, model, config)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_schedule(cfg, optimizer)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, model, scheduler


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`optimizer_groups`."""
    groups = optimizer_groups(model, cfg.optim.weight_decay)
    return torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """Linear warmup, then cosine decay to ``optim.min_lr_ratio``."""
    total = cfg.trainer.max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
    )


def _autoep_engine(cfg: TrainConfig, model: nn.Module, config: dict) -> tuple[Any, nn.Module, Any]:
    """DeepSpeed AutoEP converts the MoE blocks inside ``deepspeed.initialize``; the optimizer
    is built after that (from callables), with the losses attached to the new layers first so
    their routers join the no-decay group and the experts their expert-parallel groups."""
    import deepspeed

    def optimizer(_params: Any) -> torch.optim.Optimizer:
        model.attach_autoep(cfg.loss)
        return build_optimizer(cfg, model)

    config["expert_parallel"] = model.autoep_section(cfg.moe.ep_size)
    with model.autoep_conversion():  # AutoEP reads the routing from model.config
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: build_schedule(cfg, opt),
            config=config,
        )
    return engine, model, scheduler
