"""The training loop: a DeepSpeed engine over a MoE LM with moespec's routing losses.

One function, :func:`train`, takes a resolved :class:`TrainConfig` and a run directory. It
runs unchanged as one plain process, under ``torchrun`` and under the ``deepspeed`` launcher.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from ..routing import (
    TokenContext,
    clear_router_losses,
    collect_router_losses,
    collect_routing_stats,
    iter_routers,
    restore_loss_weights,
    set_token_context,
    step_score_biases,
    validate_loss_config,
)
from ..routing.metrics import CollapseMonitor, load_fraction
from . import checkpoint as ckpt
from .compare import CompareError, load_run
from .config import TrainConfig
from .data import DataBundle, batch_iterator, build_data, validate_data_config
from .launch import free_port
from .logging import MetricsLogger, loss_metrics, routing_metrics, run_level

log = logging.getLogger("moespec")


class TrainingError(RuntimeError):
    """A run that cannot go on (bad input, non-finite loss); the message is one line."""


# ----------------------------------------------------------------------- distributed


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(
        values, dtype=torch.float64, device=_device() if dist.get_backend() == "nccl" else "cpu"
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


# ----------------------------------------------------------------------------- setup


def validate_recipe(cfg: TrainConfig) -> None:
    """Every check that needs no data, model weights or processes: bad input fails at once."""
    cfg.moe.validate()
    validate_loss_config(cfg.loss)
    cfg.optim.validate()
    cfg.trainer.validate()
    if cfg.trainer.resume not in ("none", "auto", ""):
        ckpt.resolve_resume(cfg.trainer.resume, Path())  # an explicit checkpoint must exist
    deepspeed_config(cfg)
    validate_data_config(cfg.data)
    if cfg.model.type == "hf":
        from ..models.hf_train import check_model_source

        check_model_source(cfg)
    elif cfg.model.type != "tiny":
        raise TrainingError(f"model.type={cfg.model.type!r}; valid: tiny, hf")


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The model of ``cfg.model`` with the MoE backend and losses of ``cfg``."""
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
    if ds.zero_stage not in (0, 1, 2):
        raise TrainingError(f"deepspeed.zero_stage={ds.zero_stage}; valid with MoE layers: 0, 1, 2")
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


# ------------------------------------------------------------------------ statistics


def window_statistics(
    model: nn.Module,
) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray | None]:
    """Per-layer metrics, load fractions [L,E] and expert×domain counts [L,E,D]; new window."""
    per_layer = collect_routing_stats(model, reset=False)
    routers = iter_routers(model)
    loads = [load_fraction(r.stats.slot_counts).numpy() for r in routers]
    joints = [r.stats.domain_counts.numpy() for r in routers]
    for r in routers:
        r.stats.reset()
    load = np.stack(loads) if loads else np.zeros((0, 0))
    width = max((j.shape[1] for j in joints), default=0)
    joint = (
        np.stack([np.pad(j, ((0, 0), (0, width - j.shape[1]))) for j in joints]) if width else None
    )
    return per_layer, load, joint


@torch.no_grad()
def evaluate(
    engine: Any, model: nn.Module, data: DataBundle, cfg: TrainConfig, rank: int, world: int
) -> dict[str, float]:
    """Validation loss, overall and per domain, over ``trainer.eval_batches`` batches per rank."""
    model.eval()
    for r in iter_routers(model):
        r.track_stats = False
    num_domains = len(data.domains)
    sums = np.zeros(2 + 2 * num_domains)
    batches = min(
        cfg.trainer.eval_batches, len(data.val) // (cfg.deepspeed.micro_batch_size * world)
    )
    it = batch_iterator(
        data.val, cfg.deepspeed.micro_batch_size, seed=0, rank=rank, world_size=world, num_epochs=1
    )
    device = _device()
    for _ in range(batches):
        batch = next(it)
        out = engine(batch["input_ids"].to(device), batch["labels"].to(device))
        tl = out.token_losses.float().cpu()
        sums[0] += float(tl.sum())
        sums[1] += tl.numel()
        dom = batch["domain_ids"]
        for d in range(num_domains):
            mask = dom == d
            sums[2 + 2 * d] += float(tl[mask].sum())
            sums[3 + 2 * d] += float(mask.sum())
    clear_router_losses(model)
    for r in iter_routers(model):
        r.track_stats = True
    model.train()
    sums = np.array(_all_reduce(sums.tolist()))
    if batches == 0 or sums[1] == 0:
        return {}
    out = {"val/loss": sums[0] / sums[1]}
    for d, name in enumerate(data.domains):
        if sums[3 + 2 * d] > 0:
            out[f"val/loss/{name}"] = sums[2 + 2 * d] / sums[3 + 2 * d]
    return out


def _restore_window(
    window: dict[str, Any] | None,
    acc: np.ndarray,
    routers: list[Any],
    monitor: CollapseMonitor,
) -> None:
    """Continue the logging window that a checkpoint cut (sums, routing statistics, alarms).

    Only with the world size of the run that saved it; otherwise the window starts afresh.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not window or len(window["routing"]) != len(routers) or window.get("world") != world:
        return
    acc[:] = window["acc"]
    for router, stats in zip(routers, window["routing"]):
        router.stats.load_state_dict(stats)
    monitor.load_state_dict(window["monitor"])


# ------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    """Train with the recipe ``cfg``, writing logs, plots and checkpoints under ``run_dir``."""
    import deepspeed

    rank, world = init_distributed()
    validate_recipe(cfg)
    torch.manual_seed(cfg.trainer.seed)
    np.random.seed(cfg.trainer.seed)
    if cfg.moe.ep_size > world:
        raise TrainingError(
            f"moe.ep_size={cfg.moe.ep_size} exceeds the {world} process(es) launched"
        )

    # Data: rank 0 builds the cache, the others read it after the barrier.
    data = None
    hf_tok = None
    if cfg.model.type == "hf":  # the HF model's own tokenizer, when its directory has one
        from ..models.hf_train import hf_data_tokenizer

        hf_tok = hf_data_tokenizer(cfg)
    if rank == 0:
        data = build_data(cfg.data, rank=0, tokenizer=hf_tok)
    dist.barrier()
    if rank != 0:
        data = build_data(cfg.data, rank=rank, tokenizer=hf_tok)
    assert data is not None
    vocab = len(data.tokenizer)

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, vocab).to(_device())
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
    gas = cfg.deepspeed.gradient_accumulation_steps
    micro = cfg.deepspeed.micro_batch_size
    if len(data.train) < micro * world:
        raise TrainingError(
            f"only {len(data.train)} training sequences for {world} rank(s) × micro batch {micro}; "
            "lower deepspeed.micro_batch_size or data.seq_len"
        )

    ckpt_root = run_dir / "checkpoints"
    resume_from = ckpt.resolve_resume(cfg.trainer.resume, ckpt_root)
    routers = iter_routers(model)
    for r in routers:  # the score-correction bias moves once per optimizer step
        r.defer_bias_update = True
    monitor = CollapseMonitor(patience=cfg.trainer.collapse_patience)
    acc = np.zeros(6)  # lm, total, aux, orth, var, count: sums over the logging window
    start_step, sampler_state = 0, None
    if resume_from is not None:
        if rank == 0:
            for moved in ckpt.set_aside_newer(ckpt_root, resume_from):
                log.warning("newer than the resume point, set aside: %s", moved)
        dist.barrier()
        state = ckpt.load_checkpoint(engine, resume_from)
        start_step, sampler_state = state["step"], state["sampler"]
        changed = restore_loss_weights(model, state.get("weights"))
        _restore_window(state["rank"].get("window"), acc, routers, monitor)
        if rank == 0:
            log.info("resumed from %s (step %d)", resume_from, start_step)
            for name, (loaded, now) in changed.items():
                log.info("loss weight %s: %.4g in the checkpoint, %.4g now", name, loaded, now)
    done = run_dir / "summary.json"
    if start_step >= total and done.is_file():
        if rank == 0:
            log.info(
                "the run already finished (step %d of trainer.max_steps=%d); nothing to do",
                start_step,
                total,
            )
        return json.loads(done.read_text())
    batches = batch_iterator(data.train, micro, seed=cfg.data.seed, rank=rank, world_size=world)
    if sampler_state is not None:
        batches.load_state_dict(sampler_state)

    def save(step: int) -> None:
        state = {"step": step, "sampler": batches.state_dict(), "weights": last_weights}
        window = {
            "world": world,
            "acc": acc.tolist(),
            "routing": [r.stats.state_dict() for r in routers],
            "monitor": monitor.state_dict(),
        }
        ckpt.save_checkpoint(
            engine, ckpt_root, step, state, cfg.trainer.keep_checkpoints, {"window": window}
        )

    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    run_name = cfg.run_name or run_dir.name
    logger = MetricsLogger(
        run_dir, cfg.wandb, config_dict, run_name, enabled=rank == 0, resume=resume_from is not None
    )
    if resume_from is not None and (moved := logger.rewind(start_step)):
        log.warning(
            "%d metrics rows after step %d moved to metrics.superseded.jsonl", moved, start_step
        )
    bar = None
    if rank == 0 and cfg.trainer.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True)

    device = _device()
    # A resumed run's summary starts from what the run logged before (e.g. its last eval).
    last: dict[str, float] = {}
    if resume_from is not None and rank == 0 and (run_dir / "metrics.jsonl").is_file():
        try:
            last = load_run(run_dir).summary
        except CompareError as err:
            log.warning("the summary starts afresh: %s", err)
    last_weights = routers[0].loss_weights.as_dict() if routers else {}
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start_step + 1, total + 1):
        for _ in range(gas):
            batch = next(batches)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            b, s = ids.shape
            set_token_context(
                model,
                TokenContext(
                    sequence_ids=torch.arange(b, device=device).repeat_interleave(s),
                    domain_ids=batch["domain_ids"].reshape(-1).to(device),
                ),
            )
            out = engine(ids, labels)
            routed = collect_router_losses(model)
            if routed.calibrated and rank == 0:
                log.info("calibrated loss weights: %s", routed.calibrated)
            loss = out.loss + routed.total
            lm, tot = float(out.lm_loss.detach()), float(loss.detach())
            finite = _all_reduce([0.0 if math.isfinite(tot) else 1.0], op="max")[0] == 0.0
            if not finite and cfg.trainer.fail_on_nonfinite:
                latest = ckpt.latest_checkpoint(ckpt_root)
                raise TrainingError(
                    f"non-finite loss at step {step} (lm={lm:.4g}, total={tot:.4g}); stopped without saving; "
                    f"last complete checkpoint: {latest or 'none'}"
                )
            engine.backward(loss)
            engine.step()
            clear_router_losses(model)
            m = routed.means
            acc += [
                lm,
                tot,
                m.get("aux", 0.0),
                m.get("orthogonality", 0.0),
                m.get("variance", 0.0),
                1,
            ]
            tokens_seen += b * s
            last_layers = routed.per_layer
            last_weights = routed.weights
        step_score_biases(model)
        if bar is not None:
            bar.update(1)

        metrics: dict[str, float] = {}
        if step % cfg.trainer.log_every == 0 or step == total:
            red = _all_reduce(acc.tolist())
            n = max(red[5], 1.0)
            per_layer, load, joint = window_statistics(model)
            elapsed = time.perf_counter() - t0
            metrics = {
                "train/loss": red[1] / n,
                "train/lm_loss": red[0] / n,
                "loss/aux": red[2] / n,
                "loss/orthogonality": red[3] / n,
                "loss/variance": red[4] / n,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": tokens_seen * world / max(elapsed, 1e-9),
                "weights/alpha": last_weights.get("alpha", 0.0),
                "weights/beta": last_weights.get("beta", 0.0),
                "weights/gamma": last_weights.get("gamma", 0.0),
            }
            metrics.update({k: v for k, v in loss_metrics({}, last_layers).items()})
            metrics.update(routing_metrics(per_layer))
            for alarm in monitor.update(per_layer):
                logger.alert(step, alarm)
            # Heat maps show a logging window: the one holding each multiple of plot_every.
            window_start = (step - 1) // cfg.trainer.log_every * cfg.trainer.log_every
            plot_now = step // cfg.trainer.plot_every > window_start // cfg.trainer.plot_every
            if (plot_now or step == total) and rank == 0:
                logger.heatmaps(step, load, joint, data.domains)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.3f}",
                    aux=f"{metrics['loss/aux']:.3f}",
                    orth=f"{metrics['loss/orthogonality']:.3f}",
                    var=f"{metrics['loss/variance']:.4f}",
                    maxvio=f"{metrics.get('routing/maxvio', 0):.2f}",
                )
            acc[:] = 0
            t0, tokens_seen = time.perf_counter(), 0
        if step % cfg.trainer.eval_every == 0 or step == total:
            metrics.update(evaluate(engine, model, data, cfg, rank, world))
        if metrics:
            logger.log(step, metrics)
            last.update(metrics)

        stopping = bool(cfg.trainer.stop_after) and cfg.trainer.stop_after <= step < total
        every = cfg.trainer.save_every
        if (every and step % every == 0) or step == total or stopping:
            save(step)
        if stopping:
            if rank == 0:
                log.info(
                    "stopping after step %d of %d (trainer.stop_after); resume with trainer.resume=auto",
                    step,
                    total,
                )
            break

    if bar is not None:
        bar.close()
    if hasattr(model, "export_pretrained"):  # collective under expert parallel; rank 0 writes
        model.export_pretrained(run_dir / "hf_model")
    summary = run_level(last)
    if rank == 0:
        ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        plots = (
            sorted(str(p) for p in (run_dir / "plots").glob("*.png"))
            if (run_dir / "plots").is_dir()
            else []
        )
        log.info(
            "run directory %s; %d heat maps; wandb %s",
            run_dir,
            len(plots),
            logger.wandb_dir or "off",
        )
    logger.finish(summary)
    return summary
