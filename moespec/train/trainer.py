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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from ..data.batches import model_inputs, token_context
from ..data.pipeline import DataBundle
from ..data.sampler import batch_iterator
from ..distributed import all_reduce_floats, local_device
from ..routing import (
    clear_router_losses,
    collect_router_losses,
    iter_routers,
    restore_loss_weights,
    set_token_context,
    step_score_biases,
)
from ..routing.router import drop_balance_counts, restore_balance, steer_balance
from . import checkpoint as ckpt
from . import faults, safe_load
from .builders import (
    TrainingError,
    build_engine,
    build_run_data,
    check_data_sizes,
    validate_recipe,
)
from .callbacks import Callback, Checkpointing, MicroBatch, default_callbacks
from .config import TrainConfig
from .guard import StepGuard
from .launch import init_distributed
from .logging import MetricsLogger, run_level
from .preempt import Preempted, PreemptionHandler
from .run_metrics import CompareError, load_run
from .zero3 import gathered

log = logging.getLogger("moespec")


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
        self.loss_weights = routed.loss_weights or self.loss_weights
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


def _resume(trainer: Trainer, resume_from: Path, load_from: Path) -> None:
    """Load a checkpoint (``resume_from``, or its universal copy ``load_from``) into the
    engine, the sampler, the loss weights and the callbacks."""
    root = trainer.ckpt_root
    if trainer.rank == 0:
        for moved in ckpt.set_aside_newer(root, resume_from):
            log.warning("newer than the resume point, set aside: %s", moved)
    dist.barrier()
    state = ckpt.load_checkpoint(trainer.engine, load_from)
    trainer.start_step = state["step"]
    trainer.batches.load_state_dict(state["sampler"])
    trainer.guard.load_state_dict(state.get("guard", {}))
    saved_weights = state.get("loss_weights", state.get("weights"))  # older checkpoints: "weights"
    changed = restore_loss_weights(trainer.model, saved_weights)
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
        summary = _train(cfg, run_dir, callbacks, rank, world, preemption)
    except Preempted:
        preemption.ignore_from_now()
        raise
    except BaseException:
        preemption.uninstall()
        raise
    preemption.uninstall()
    return summary


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
    resume_from = ckpt.resolve_resume(cfg.trainer.resume, run_dir / "checkpoints")
    universal = resume_from is not None and ckpt.check_layout(  # refused here, before the build
        resume_from, ckpt.run_layout(cfg, world)
    )
    engine, model, scheduler = build_engine(cfg, len(data.tokenizer), load_universal=universal)
    safe_load.install(engine)
    faults.point("setup")
    check_data_sizes(cfg, data, world)
    trainer = Trainer(
        cfg, run_dir, engine, model, data, scheduler, rank, world,
        default_callbacks(callbacks), preemption,
    )  # fmt: skip
    for r in iter_routers(model):  # the score-correction bias moves once per optimizer step
        r.defer_bias_update = True
    if resume_from is not None:
        load_from = resume_from
        if universal:  # an AutoEP run at another moe.ep_size: DeepSpeed's universal format
            load_from = ckpt.universal_copy(resume_from, run_dir / "universal")
        _resume(trainer, resume_from, load_from)
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
