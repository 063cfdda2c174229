"""Worker: one rank of a short training run that records every micro-batch's losses.

Usage: torchrun --nproc_per_node N tests/workers/train_window.py OUT_DIR OVERRIDE...
Writes OUT_DIR/rank{r}.json: per micro-batch the step, total and LM loss and the per-layer
raw routing losses, as the trainer computed them (before any window reduction).
"""

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from moespec.cli import check_overrides
from moespec.paths import recipes_dir
from moespec.train.callbacks import Callback
from moespec.train.config import register_configs
from moespec.train.launch import init_distributed
from moespec.train.trainer import train


class Recorder(Callback):
    """Keeps each micro-batch's figures; writes them when training ends. Logs a metric of its
    own at every step (``user/steps_seen``), as a user's callback would."""

    name = "recorder"

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, []

    def on_micro_batch(self, trainer, micro) -> None:
        self.rows.append(
            {
                "step": trainer.step,
                "loss": micro.loss,
                "lm_loss": micro.lm_loss,
                "per_layer": micro.routed.per_layer,
            }
        )

    def on_step_end(self, trainer) -> None:
        trainer.metrics["user/steps_seen"] = float(trainer.step)

    def on_train_end(self, trainer) -> None:
        self.path.write_text(json.dumps(self.rows))


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    register_configs()
    rank, _ = init_distributed()
    cfg = OmegaConf.to_object(check_overrides(overrides, recipes_dir(), "train"))
    train(cfg, out_dir / "run", callbacks=[Recorder(out_dir / f"rank{rank}.json")])


if __name__ == "__main__":
    main()
