"""The training loop: a DeepSpeed engine over a MoE LM with moespec's routing losses.

:func:`train` takes a resolved :class:`TrainConfig` and a run directory, sets up the engine and
runs the :class:`Trainer`'s step loop; logging, evaluation, checkpoints, heat maps, the collapse
alarm and progress are callbacks (``moespec.train.callbacks``). It runs unchanged as one
plain process, under ``torchrun`` and under the ``deepspeed`` launcher.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from ..data.batches import model_inputs, token_context
from ..data.build import build_data
from ..data.pipeline import DataBundle, validate_data_config
from ..data.sampler import batch_iterator
from ..distributed import all_reduce_floats, local_device
from ..eval.sets import validate_eval_config
from ..routing import (
    clear_router_losses,
    collect_router_losses,
    iter_routers,
    restore_loss_weights,
    set_token_context,
    step_score_biases,
    validate_loss_config,
)
from ..routing.router import drop_balance_counts, restore_balance, steer_balance
from . import checkpoint as ckpt
from . import faults, safe_load
from .callbacks import Callback, Checkpointing, MicroBatch, default_callbacks
from .compare import CompareError, load_run
from .config import TrainConfig
from .guard import StepGuard
from .launch import free_port, unlink_shm_allreduce_buffer
from .logging import MetricsLogger, run_level
from .preempt import Preempted, PreemptionHandler
from .zero3 import gathered, register_leaf_blocks, zero3_problem

log = logging.getLogger("moespec")


class TrainingError(RuntimeError):
    """A run that cannot go on (bad input, non-finite loss); the message is one line."""


# ----------------------------------------------------------------------- distributed


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA).

    ``timeout_s`` bounds every collective of the process group: a rank left waiting for one
    that died raises instead of hanging.
    """
    from datetime import timedelta

    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        if backend == "gloo":
            if dist.get_world_size() > 1:
                dist.barrier()  # every rank has mapped every rank's buffer
            unlink_shm_allreduce_buffer(dist.get_rank())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------- setup


def validate_recipe(cfg: TrainConfig) -> None:
    """Every check that needs no data, model weights or processes: bad input fails at once."""
    cfg.moe.validate()
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


# ------------------------------------------------------------------------------ loop


class Trainer:
    """The step loop over a DeepSpeed engine; everything around it is a :class:`Callback`.

    Callbacks read the run (``cfg``, ``model``, ``engine``, ``data``, ``logger``) and the
    step (``step``, ``is_log_step``, ``metrics``, ``window``) from here.
    """

    weights_shown = False  # the loss weights are logged once, at the first step of a process

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, engine: Any, model: nn.Module, data: DataBundle,
        scheduler: Any, rank: int, world: int, callbacks: list[Callback],
        preemption: PreemptionHandler | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.engine, self.model = cfg, run_dir, engine, model
        self.data, self.scheduler, self.rank, self.world = data, scheduler, rank, world
        self.callbacks = callbacks
        self.device = local_device()
        self.ckpt_root = run_dir / "checkpoints"
        self.total_steps = cfg.trainer.max_steps
        self.start_step = self.step = 0
        self.step_seconds = 0.0
        self.metrics: dict[str, float] = {}  # this step's figures, filled by callbacks
        self.last: dict[str, float] = {}  # the latest value of every figure logged
        self.window: Any = None  # the logging window closed at this step (callbacks.window)
        self.should_stop = False
        self.batches = batch_iterator(
            data.train, cfg.deepspeed.micro_batch_size, seed=cfg.data.seed, rank=rank,
            world_size=world,
        )  # fmt: skip
        routers = iter_routers(model)
        self.loss_weights = routers[0].loss_weights.as_dict() if routers else {}
        self.logger: MetricsLogger | None = None
        tc = cfg.trainer
        self.guard = StepGuard(tc.nonfinite, tc.spike_factor, tc.spike_window, tc.max_skipped_steps)
        self.skip_cause: str | None = None  # why this optimizer step is skipped
        self.preemption = preemption or PreemptionHandler(list(tc.preempt_signals))

    @property
    def is_log_step(self) -> bool:
        return self.step % self.cfg.trainer.log_every == 0 or self.is_last_step

    @property
    def is_last_step(self) -> bool:
        return self.step == self.total_steps

    def callback_states(self) -> dict[str, Any]:
        """This rank's state of every callback, for a checkpoint."""
        states = {cb.name: cb.state_dict(self) for cb in self.callbacks}
        return {"world": self.world, "callbacks": {k: v for k, v in states.items() if v}}

    def load_callback_states(self, rank_state: dict[str, Any]) -> None:
        """Continue the callbacks' states of a checkpoint saved with the same world size."""
        if rank_state.get("world") != self.world:
            return  # the window starts afresh
        saved = rank_state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(self, saved[cb.name])

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def micro_batch(
        self, batch: dict[str, torch.Tensor], trained: int, step_tokens: float
    ) -> MicroBatch:
        """Forward, routing losses, backward and engine step of one micro-batch.

        The LM loss is scaled so that the step's gradient is that of the mean over all
        ``step_tokens`` trained tokens of its micro-batches and ranks (DeepSpeed averages
        micro-batches and ranks), however the trained tokens are spread over them.
        """
        ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        inputs = model_inputs(batch, self.device)
        set_token_context(self.model, token_context(batch, self.device))
        out = self.engine(ids, labels, **inputs)
        routed = collect_router_losses(self.model)
        if (routed.calibrated or not self.weights_shown) and self.rank == 0:
            head = "calibrated loss weights" if routed.calibrated else "loss weights"
            log.info("%s at step %d: %s", head, self.step, _weights_text(routed, out.lm_loss))
        self.weights_shown = True
        share = self.cfg.deepspeed.gradient_accumulation_steps * self.world / step_tokens
        scale = trained * share if step_tokens > 0 else 0.0
        lm_term = out.loss if scale == 1.0 else out.lm_loss * scale + (out.model_aux_loss or 0)
        loss = lm_term + routed.total
        if faults.nan_due():
            loss = loss * math.nan
        lm, tot = float(out.lm_loss.detach()), float(loss.detach())
        bad, peak = all_reduce_floats(
            [0.0 if math.isfinite(tot) else 1.0, tot if math.isfinite(tot) else -math.inf], op="max"
        )
        cause = "non-finite loss" if bad else self.guard.cause(peak)
        if bad and not self.guard.skip_nonfinite:
            latest = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainingError(
                f"non-finite loss at step {self.step} (lm={lm:.4g}, total={tot:.4g}); stopped "
                f"without saving; last complete checkpoint: {latest or 'none'}"
            )
        self.skip_cause = self.skip_cause or cause
        if self.skip_cause is None:
            self.guard.accept(peak)
        else:  # non-finite gradients: the engine's optimizer drops the whole step
            loss = loss * math.nan
        self.engine.backward(loss)
        self.engine.step()
        clear_router_losses(self.model)
        self.loss_weights = routed.weights or self.loss_weights
        return MicroBatch(loss=tot, lm_loss=lm, routed=routed, tokens=ids.numel(), trained=trained)

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step over this rank's micro-batches (``gradient_accumulation_steps``)."""
        counts = [int((b["labels"] != -100).sum()) for b in batches]  # trained tokens
        step_tokens = all_reduce_floats([float(sum(counts))])[0]
        self.skip_cause, skipped_before = None, self.engine.skipped_steps
        micros = [self.micro_batch(b, trained, step_tokens) for b, trained in zip(batches, counts)]
        if self.skip_cause is not None:
            self._skipped(skipped_before)
            return
        for micro in micros:
            self._call("on_micro_batch", micro)
        step_score_biases(self.model)
        steer_balance(self.model)

    def _skipped(self, skipped_before: int) -> None:
        """Account for an optimizer step skipped by the guard (``trainer.nonfinite=skip``)."""
        drop_balance_counts(self.model)  # the balance steers on applied steps only
        if self.engine.skipped_steps == skipped_before:
            raise TrainingError(
                f"step {self.step}: the optimizer applied a step with non-finite gradients; "
                "trainer.nonfinite=skip and trainer.spike_factor need an optimizer that drops "
                "such steps (ZeRO stage 1 or 2; with bf16, deepspeed.extra.bf16.check_grad_overflow=true)"
            )
        if self.rank == 0:
            self.logger.alert(self.step, f"optimizer step {self.step} skipped: {self.skip_cause}")
        if self.guard.step_done(skipped=True):
            latest = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainingError(
                f"{self.guard.in_a_row} optimizer steps in a row skipped (trainer.max_skipped_steps="
                f"{self.guard.max_skipped}), the last at step {self.step}: {self.skip_cause}; "
                f"last complete checkpoint: {latest or 'none'}"
            )

    def fit(self) -> None:
        """Run the steps after ``start_step`` up to ``trainer.max_steps`` (or a stop)."""
        self._call("on_train_start")
        self.step = self.start_step
        if self.preempted():  # a signal during setup: stop before training a step
            self.stop_for_preemption()
        gas = self.cfg.deepspeed.gradient_accumulation_steps
        for step in range(self.start_step + 1, self.total_steps + 1):
            self.step, self.metrics, self.window = step, {}, None
            faults.set_step(step)
            started = time.perf_counter()
            self.train_step([next(self.batches) for _ in range(gas)])
            if self.skip_cause is None:
                self.guard.step_done(skipped=False)
            if self.guard.total and self.is_log_step:
                self.metrics["train/skipped_steps"] = float(self.guard.total)
            self.step_seconds = time.perf_counter() - started
            self._call("on_step_end")
            faults.point("step")
            if self.preempted():
                self.stop_for_preemption()
            if self.should_stop:
                break
        self._call("on_train_end")

    def preempted(self) -> bool:
        """Whether any rank received a preemption signal (a collective, once per step)."""
        if not self.preemption.signals:
            return False
        return all_reduce_floats([float(self.preemption.received is not None)], op="max")[0] > 0

    def stop_for_preemption(self) -> None:
        """Checkpoint this step (unless saved or none trained) and raise :class:`Preempted`."""
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        saved = latest is not None and latest.name == ckpt.tag_for(self.step)
        if not saved and self.step > self.start_step:
            next(cb for cb in self.callbacks if isinstance(cb, Checkpointing)).save(self)
        code = self.cfg.trainer.preempt_exit_code
        if self.rank == 0:
            kept = ckpt.latest_checkpoint(self.ckpt_root)
            log.warning(
                "preempted after step %d: checkpoint %s; exit %d, resume with trainer.resume=auto",
                self.step, kept.name if kept else "none (no step trained)", code,
            )  # fmt: skip
        self.logger.finish(None)
        raise Preempted(self.step, code, self.preemption.received or "a signal on another rank")


def _weights_text(routed: Any, lm_loss: torch.Tensor) -> str:
    """``name=weight (raw r, s% of the LM loss)`` per weighted loss, saying which weights were
    calibrated by this batch and which the balance budget capped."""
    lm = float(lm_loss.detach())
    calibrated = routed.calibrated or {}
    parts = []
    for name, weight in routed.in_force.items():
        if weight == 0:
            continue
        raw = routed.calibration_raw.get(name, routed.means.get(name, math.nan))
        share = abs(routed.contributions.get(name, math.nan)) / lm if lm > 0 else math.nan
        text = f"{name}={weight:.4g} (raw {raw:.4g}; {100 * share:.3g}% of the LM loss"
        text += "; calibrated" if name in calibrated else ""
        if name in routed.calibration_capped:
            paper, _ = routed.calibration_capped[name]
            text += f"; the paper's rule gave {paper:.4g}, capped by loss.balance"
        parts.append(text + ")")
    return ", ".join(parts) or "no routing loss is weighted"


# ----------------------------------------------------------------------------- setup


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


def build_engine(cfg: TrainConfig, vocab: int) -> tuple[Any, nn.Module, Any]:
    """Model, AdamW with warmup-cosine, and the DeepSpeed engine around them."""
    import deepspeed

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, vocab).to(local_device())
    if cfg.deepspeed.zero_stage == 3:
        register_leaf_blocks(model)
    groups = optimizer_groups(model, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )
    total = cfg.trainer.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    return engine, model, scheduler


def _resume(trainer: Trainer, resume_from: Path) -> None:
    """Load a checkpoint into the engine, the sampler, the loss weights and the callbacks."""
    root = trainer.ckpt_root
    if trainer.rank == 0:
        for moved in ckpt.set_aside_newer(root, resume_from):
            log.warning("newer than the resume point, set aside: %s", moved)
    dist.barrier()
    state = ckpt.load_checkpoint(trainer.engine, resume_from)
    trainer.start_step = state["step"]
    trainer.batches.load_state_dict(state["sampler"])
    trainer.guard.load_state_dict(state.get("guard", {}))
    changed = restore_loss_weights(trainer.model, state.get("weights"))
    try:
        capped = restore_balance(trainer.model, state.get("balance"))
    except ValueError as err:
        raise TrainingError(f"{err} (checkpoint {resume_from})") from None
    trainer.load_callback_states(state["rank"])
    routers = iter_routers(trainer.model)
    trainer.loss_weights = routers[0].loss_weights.as_dict() if routers else {}
    if trainer.rank == 0:
        log.info("resumed from %s (step %d)", resume_from, trainer.start_step)
        for name, (loaded, now) in changed.items():
            log.info("loss weight %s: %.4g in the checkpoint, %.4g now", name, loaded, now)
        for name, (loaded, now) in capped.items():
            log.info(
                "loss weight %s: %.4g in the checkpoint, capped to %.4g by loss.balance",
                name,
                loaded,
                now,
            )


def _open_logger(trainer: Trainer, resumed: bool) -> None:
    """The run's metrics.jsonl/wandb logger; a resumed run continues its history."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    trainer.logger = MetricsLogger(
        run_dir, cfg.wandb, config_dict, cfg.run_name or run_dir.name,
        enabled=trainer.rank == 0, resume=resumed,
    )  # fmt: skip
    if not resumed:
        return
    if moved := trainer.logger.rewind(trainer.start_step):
        log.warning(
            "%d metrics rows after step %d moved to metrics.superseded.jsonl",
            moved, trainer.start_step,
        )  # fmt: skip
    if trainer.rank == 0 and (run_dir / "metrics.jsonl").is_file():
        try:  # the summary starts from what the run logged before (e.g. its last eval)
            trainer.last = load_run(run_dir).summary
        except CompareError as err:
            log.warning("the summary starts afresh: %s", err)


def _finish(trainer: Trainer) -> dict[str, float]:
    """Export (HF models), write summary.json and close the logger."""
    if hasattr(trainer.model, "export_pretrained"):  # collective under expert parallel
        with gathered(trainer.model):  # ZeRO-3: whole parameters
            trainer.model.export_pretrained(
                trainer.run_dir / "hf_model", trainer.data.tokenizer, trainer.step
            )
    summary = run_level(trainer.last)
    run_dir = trainer.run_dir
    if trainer.rank == 0:
        ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        plots = list((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
        log.info(
            "run directory %s; %d heat maps; wandb %s",
            run_dir, len(plots), trainer.logger.wandb_dir or "off",
        )  # fmt: skip
    trainer.logger.finish(summary)
    return summary


def train(
    cfg: TrainConfig, run_dir: Path, callbacks: list[Callback] | None = None
) -> dict[str, float]:
    """Train with the recipe ``cfg``, writing logs, plots and checkpoints under ``run_dir``.

    ``callbacks`` run after the default ones and before the metrics log, so what they add to
    ``trainer.metrics`` is logged (:func:`~moespec.train.callbacks.default_callbacks`).
    """
    rank, world = init_distributed(cfg.trainer.collective_timeout_s)
    validate_recipe(cfg)
    faults.configure(rank)
    preemption = PreemptionHandler(list(cfg.trainer.preempt_signals))
    preemption.install()  # from here on a signal is noted, and acted on before the first step
    try:
        return _train(cfg, run_dir, callbacks, rank, world, preemption)
    finally:
        if not isinstance(sys.exc_info()[1], Preempted):
            preemption.uninstall()


def _train(
    cfg: TrainConfig, run_dir: Path, callbacks: list[Callback] | None, rank: int, world: int,
    preemption: PreemptionHandler,
) -> dict[str, float]:  # fmt: skip
    """:func:`train` once the process group is up and the preemption signals are taken."""
    torch.manual_seed(cfg.trainer.seed)
    np.random.seed(cfg.trainer.seed)
    if cfg.moe.ep_size > world:
        raise TrainingError(
            f"moe.ep_size={cfg.moe.ep_size} exceeds the {world} process(es) launched"
        )
    data = build_run_data(cfg, rank)
    engine, model, scheduler = build_engine(cfg, len(data.tokenizer))
    safe_load.install(engine)
    faults.point("setup")
    check_data_sizes(cfg, data, world)
    trainer = Trainer(
        cfg, run_dir, engine, model, data, scheduler, rank, world,
        default_callbacks(callbacks), preemption,
    )  # fmt: skip
    for r in iter_routers(model):  # the score-correction bias moves once per optimizer step
        r.defer_bias_update = True
    resume_from = ckpt.resolve_resume(cfg.trainer.resume, trainer.ckpt_root)
    if resume_from is not None:
        _resume(trainer, resume_from)
    elif cfg.trainer.resume == "auto" and rank == 0:
        log.info(
            "trainer.resume=auto: no checkpoint in %s yet; starting at step 0", trainer.ckpt_root
        )
    done = run_dir / "summary.json"
    if trainer.start_step >= trainer.total_steps and done.is_file():
        if rank == 0:
            log.info(
                "the run already finished (step %d of trainer.max_steps=%d); nothing to do",
                trainer.start_step, trainer.total_steps,
            )  # fmt: skip
        return json.loads(done.read_text())
    _open_logger(trainer, resumed=resume_from is not None)
    trainer.fit()
    return _finish(trainer)
