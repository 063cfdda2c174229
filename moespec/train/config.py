"""The training schema: one dataclass per component, registered in Hydra's ConfigStore.

The recipe tree in ``recipes/`` composes over :class:`TrainConfig`; since the root is a
structured config, a misspelled key anywhere is an error that names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from ..data.pipeline import DataConfig
from ..eval.sets import EvalConfig
from ..models.tiny import TinyMoEConfig
from ..moe.config import MoEConfig
from ..routing.config import LossConfig
from .preempt import parse_signals


@dataclass
class LoraConfig:
    """LoRA adapters for Hugging Face models (via peft): on ``target_modules`` (linear layers),
    on the fused expert weights (``experts``) and on the router (``router_lora``)."""

    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    train_router: bool = True
    experts: bool = False  # LoRA on the fused 3-D expert weights (peft target_parameters)
    router_lora: bool = False  # LoRA on the router weight, which then stays frozen


@dataclass
class ModelConfig:
    """Which model to train: moespec's tiny MoE LM or a Hugging Face model."""

    type: str = "tiny"
    tiny: TinyMoEConfig = field(default_factory=TinyMoEConfig)
    name_or_path: str | None = None
    config: str | None = None
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    upcycle_experts: int = 0
    upcycle_top_k: int = 2
    upcycle_noise: float = 0.0
    #: Keys of the HF model's own config set before it is built (``+model.overrides.KEY=V``).
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine: ZeRO stage, micro batch, accumulation, clipping, precision."""

    zero_stage: int = 1
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainerConfig:
    """Loop length, logging, evaluation, checkpointing and resumption."""

    max_steps: int = 200
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    plot_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "none"
    stop_after: int = 0
    collapse_patience: int = 3
    collapse_maxvio: float = 0.75  # alarm: relative MaxVio (of E/k - 1) at or above
    collapse_entropy: float = 0.25  # ... and relative load entropy at or below
    progress: bool = True
    nonfinite: str = "error"
    max_skipped_steps: int = 10
    spike_factor: float = 0.0
    spike_window: int = 20
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preempt_exit_code: int = 75
    collective_timeout_s: float = 1800.0
    activation_checkpointing: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        minimum = {"keep_checkpoints": 0, "stop_after": 0, "save_every": 0, "max_skipped_steps": 0}
        for name in (
            "max_steps", "log_every", "eval_every", "eval_batches", "plot_every", "save_every",
            "collapse_patience", "keep_checkpoints", "stop_after", "max_skipped_steps",
            "spike_window",
        ):  # fmt: skip
            low = minimum.get(name, 1)
            if getattr(self, name) < low:
                raise ValueError(f"trainer.{name} must be >= {low}, got {getattr(self, name)}")
        if not (isinstance(self.collapse_maxvio, int | float) and 0 < self.collapse_maxvio <= 1):
            raise ValueError(
                "trainer.collapse_maxvio must be in (0, 1] (a share of the largest possible "
                f"MaxVio, E/k - 1), got {self.collapse_maxvio!r}"
            )
        if not (isinstance(self.collapse_entropy, int | float) and 0 <= self.collapse_entropy < 1):
            raise ValueError(
                "trainer.collapse_entropy must be in [0, 1) (0: collapsed load, 1: uniform), "
                f"got {self.collapse_entropy!r}"
            )
        parse_signals(list(self.preempt_signals))
        if self.nonfinite not in ("error", "skip"):
            raise ValueError(f"trainer.nonfinite={self.nonfinite!r}; valid: error, skip")
        if not (self.spike_factor == 0 or self.spike_factor > 1):
            raise ValueError(
                f"trainer.spike_factor must be 0 (off) or > 1, got {self.spike_factor}"
            )
        if not 1 <= self.preempt_exit_code <= 255:
            raise ValueError(
                f"trainer.preempt_exit_code must be in 1..255, got {self.preempt_exit_code}"
            )
        if not self.collective_timeout_s > 0:
            raise ValueError(
                f"trainer.collective_timeout_s must be > 0, got {self.collective_timeout_s}"
            )


@dataclass
class WandbConfig:
    """Weights & Biases run settings; offline unless ``mode=online`` or ``WANDB_MODE`` says so."""

    enabled: bool = True
    project: str = "moespec"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    group: str | None = None


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_name: str | None = None


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
