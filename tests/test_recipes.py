"""Every recipe composes against the strict schema; overrides reach the typed config."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moespec.paths import recipes_dir
from moespec.train.config import TrainConfig, register_configs
from moespec.train.trainer import deepspeed_config

EXPERIMENTS = sorted(p.stem for p in (recipes_dir() / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert isinstance(cfg, TrainConfig)
    cfg.moe.validate()
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage


@pytest.mark.parametrize("group", ["moe", "loss", "deepspeed", "data", "model"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml")):
        extra = ["data.source=corpus.jsonl"] if (group, option) == ("data", "jsonl") else []
        _compose([f"{group}={option}", *extra])


def test_loss_overrides_reach_typed_config():
    cfg = _compose(
        [
            "loss.orthogonality.weight=1e-4",
            "loss.variance.weight=auto",
            "loss.aux.weight=1e-3",
            "loss.aux.scope=sequence",
        ]
    )
    assert cfg.loss.orthogonality.weight == pytest.approx(1e-4)
    assert cfg.loss.variance.weight == "auto"
    assert cfg.loss.aux.weight == pytest.approx(1e-3) and cfg.loss.aux.scope == "sequence"


def test_unknown_key_names_it():
    with pytest.raises(Exception, match="orthogonalty"):
        _compose(["loss.orthogonalty.weight=1e-4"])


def test_gpu_recipes_use_bf16_and_deepspeed():
    cfg = _compose(["experiment=smoke_gpu"])
    assert (
        cfg.deepspeed.precision == "bf16"
        and cfg.deepspeed.zero_stage == 2
        and cfg.moe.backend == "deepspeed"
    )
    assert deepspeed_config(cfg)["bf16"]["enabled"] is True


def test_installed_package_carries_every_recipe(tmp_path):
    """A wheel (what `pip install .` and the docker image install) holds the whole recipe tree."""
    import subprocess
    import sys
    import zipfile

    root = recipes_dir().parent
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("moespec-*.whl")
    packed = {
        n.removeprefix("moespec/recipes/")
        for n in zipfile.ZipFile(wheel).namelist()
        if n.startswith("moespec/recipes/")
    }
    tree = {
        str(p.relative_to(root / "recipes")) for p in (root / "recipes").rglob("*") if p.is_file()
    }
    assert tree and packed == tree
