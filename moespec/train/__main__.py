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

from ..paths import recipes_dir, torch_extensions_dir

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
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
    from .config import TrainConfig
    from .trainer import TrainingError, train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    try:
        typed: TrainConfig = OmegaConf.to_object(cfg)
        summary = train(typed, run_dir)
    except (
        TrainingError,
        ValueError,
        FloatingPointError,
        FileNotFoundError,
        NotImplementedError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val/loss")


def _destroy_process_group() -> None:
    # Once per process, not per job: DeepSpeed caches its process groups across the jobs of a
    # Hydra multirun, so the default group must outlive each job.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_overrides(argv: list[str]) -> None:
    """Compose the recipe once and turn a bad override into one ``error:`` line (exit 2).

    Sweeps (``-m``) and Hydra's own flags are left to Hydra.
    """
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ or err.__context__
        new = (
            cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in str(err)
        )
        detail = _one_line(str(cause)) if new else ""
        print(f"error: {_one_line(str(err))} {detail}".rstrip(), file=sys.stderr)
        sys.exit(2)


def _one_line(message: str) -> str:
    """Hydra's multi-line composition error as one line (keeps the key and the valid options)."""
    lines = [ln.strip() for ln in message.splitlines()]
    cut = next((i for i, ln in enumerate(lines) if ln.startswith("Available options")), None)
    skip = ("full_key", "object_type", "reference_type", "To append")
    head = [ln for ln in lines[: min(cut or 4, 4)] if ln and not ln.startswith(skip)]
    if cut is not None:
        options = []
        for ln in lines[cut + 1 :]:
            if not ln or ln.startswith("Config search path"):
                break
            options.append(ln)
        head.append("valid: " + ", ".join(options))
    return " ".join(head)


def main() -> None:
    """Console entry point."""
    sys.argv = [sys.argv[0], *_shared_run_dir(_strip_launcher_args(sys.argv[1:]))]
    _check_overrides(sys.argv[1:])
    atexit.register(_destroy_process_group)
    _hydra_main()


if __name__ == "__main__":
    main()
