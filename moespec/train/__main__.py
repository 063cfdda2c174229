"""``python -m moespec.train`` / ``moespec-train``: the Hydra entry point over ``recipes/``.

Runs as one process, under ``torchrun --nproc_per_node N -m moespec.train`` and under
``deepspeed --num_gpus N --module moespec.train`` (the ``--local_rank`` argument that the
DeepSpeed launcher appends is accepted and stripped).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

from ..cli import check_overrides, fail, prepare_environment
from ..paths import recipes_dir

prepare_environment()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from .config import register_configs  # noqa: E402

log = logging.getLogger("moespec")
register_configs()


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (DeepSpeed launcher) and keep the rest."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def _shared_run_dir(argv: list[str]) -> list[str]:
    """Under a launcher, give every rank the same run directory (one per launch).

    Hydra's default directory is a timestamp that can differ between ranks by a second;
    ranks of one launch share their parent process, so its pid and start time name the run.
    Ranks other than 0 do not write ``.hydra/``.
    """
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return argv
    if any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in argv):
        extra = []
    else:
        ppid = os.getppid()
        try:
            start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except OSError:
            start = "0"
        extra = [f"hydra.run.dir=outputs/launch-{ppid}-{start}"]
    if os.environ.get("RANK", "0") != "0":
        extra.append("hydra.output_subdir=null")
    return argv + extra


@hydra.main(version_base=None, config_path=str(recipes_dir()), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from ..moe.backend import BackendUnavailableError
    from .builders import TrainingError, refuse_ignored_keys
    from .checkpoint import CheckpointSaveError
    from .config import TrainConfig
    from .preempt import Preempted
    from .trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    try:
        typed: TrainConfig = OmegaConf.to_object(cfg)
        refuse_ignored_keys(typed, list(HydraConfig.get().overrides.task))
        typed.run_name = typed.run_name or sweep_job_name()
        summary = train(typed, run_dir)
    except Preempted as stop:
        raise SystemExit(stop.code) from None
    except (
        TrainingError,
        CheckpointSaveError,
        BackendUnavailableError,
        ValueError,
        FloatingPointError,
        FileNotFoundError,
        NotImplementedError,
    ) as err:
        fail(err)
    return summary.get("val/loss")


def sweep_job_name() -> str | None:
    """A multirun job's name, e.g. ``2:loss.orthogonality.weight=0.1`` (its number and its
    overrides); ``None`` for a single run, named after its directory."""
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"{hc.job.num}:{hc.job.override_dirname}"


def _destroy_process_group() -> None:
    # Once per process, not per job: DeepSpeed caches its process groups across the jobs of a
    # Hydra multirun, so the default group must outlive each job.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_recipe(overrides: list[str]) -> None:
    """Compose the recipe, run every check that needs no model, and read the recipe's own data
    files as the run will (cached for it); exit 2 on a fault. Split sizes are checked for
    ``WORLD_SIZE`` ranks (1 unless set)."""
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        fail(f"--check takes overrides only, not {' '.join(flags)}")
    cfg = check_overrides(overrides, recipes_dir(), "train")
    from .builders import TrainingError, check_run_data, refuse_ignored_keys, validate_recipe
    from .config import TrainConfig

    try:
        typed: TrainConfig = OmegaConf.to_object(cfg)
        validate_recipe(typed)
        refuse_ignored_keys(typed, overrides)
        check_run_data(typed, int(os.environ.get("WORLD_SIZE", "1")))
    except (TrainingError, ValueError, FileNotFoundError) as err:
        fail(err)
    print("ok: the recipe composes and passes its checks")


def main() -> None:
    """Console entry point; ``--check OVERRIDES`` only composes the recipe (exit 0 or 2)."""
    if sys.argv[1:2] == ["--check"]:
        check_recipe(sys.argv[2:])
        return
    sys.argv = [sys.argv[0], *_shared_run_dir(_strip_launcher_args(sys.argv[1:]))]
    check_overrides(sys.argv[1:], recipes_dir(), "train")
    atexit.register(_destroy_process_group)
    _hydra_main()


if __name__ == "__main__":
    main()
