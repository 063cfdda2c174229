"""Every recipe composes against the strict schema; overrides reach the typed config."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moespec.paths import recipes_dir
from moespec.train.builders import deepspeed_config
from moespec.train.config import TrainConfig, register_configs

EXPERIMENTS = sorted(p.stem for p in (recipes_dir() / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(cfg)


def _yaml(path):
    return yaml.safe_load(path.read_text()) or {}


def _expected_deepspeed(experiment: str) -> tuple[str, dict]:
    """The deepspeed option an experiment selects and the fields it ends with, read from the
    YAML files: train.yaml's default, overridden by ``override /deepspeed`` in the experiment
    (or an experiment it includes), the option's file, then the experiments' own values."""
    (option,) = [d["deepspeed"] for d in _yaml(recipes_dir() / "train.yaml")["defaults"]
                 if isinstance(d, dict) and "deepspeed" in d]  # fmt: skip
    own: dict = {}

    def visit(name: str) -> None:
        nonlocal option
        doc = _yaml(recipes_dir() / "experiment" / f"{name}.yaml")
        for entry in doc.get("defaults", []):
            if isinstance(entry, str):
                visit(entry)  # another experiment, merged before this one's values
            elif "override /deepspeed" in entry:
                option = entry["override /deepspeed"]
        own.update(doc.get("deepspeed", {}))

    visit(experiment)
    return option, {**_yaml(recipes_dir() / "deepspeed" / f"{option}.yaml"), **own}


def _parsed_by_deepspeed(cfg: TrainConfig):
    config = pytest.importorskip("deepspeed.runtime.config")
    return config.DeepSpeedConfig(deepspeed_config(cfg))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert isinstance(cfg, TrainConfig)
    cfg.moe.validate()
    option, want = _expected_deepspeed(experiment)
    got = OmegaConf.to_container(OmegaConf.structured(cfg.deepspeed))
    assert {k: got[k] for k in want} == want, option
    ds = _parsed_by_deepspeed(cfg)  # the JSON as DeepSpeed reads it
    assert ds.zero_optimization_stage == want["zero_stage"]
    assert ds.train_micro_batch_size_per_gpu == want["micro_batch_size"]
    assert ds.gradient_accumulation_steps == want["gradient_accumulation_steps"]
    assert ds.train_batch_size == want["micro_batch_size"] * want["gradient_accumulation_steps"]
    assert ds.gradient_clipping == want["gradient_clipping"]
    assert ds.bfloat16_config.enabled == (want["precision"] == "bf16")
    assert ds.float16_config.enabled == (want["precision"] == "fp16")


def test_deepspeed_precedence_command_line_over_experiment_over_group_file():
    """experiment=smoke_gpu picks zero2_bf16; deepspeed=zero1 on the command line wins over
    that, the experiment's micro_batch_size still wins over zero1.yaml's, and a key override
    wins over both."""
    zero1 = _yaml(recipes_dir() / "deepspeed" / "zero1.yaml")
    smoke_gpu = _yaml(recipes_dir() / "experiment" / "smoke_gpu.yaml")["deepspeed"]
    assert smoke_gpu["micro_batch_size"] != zero1["micro_batch_size"]  # else nothing is shown
    cfg = _compose(["experiment=smoke_gpu", "deepspeed=zero1"])
    ds = _parsed_by_deepspeed(cfg)
    assert ds.zero_optimization_stage == zero1["zero_stage"] == 1
    assert not ds.bfloat16_config.enabled and zero1["precision"] == "fp32"
    assert ds.train_micro_batch_size_per_gpu == smoke_gpu["micro_batch_size"]
    cfg = _compose(["experiment=smoke_gpu", "deepspeed=zero1", "deepspeed.micro_batch_size=3"])
    assert _parsed_by_deepspeed(cfg).train_micro_batch_size_per_gpu == 3


GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("moe", "loss", "deepspeed", "data", "model")
    for p in sorted((recipes_dir() / group).glob("*.yaml"))
]


def test_every_group_has_options():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert groups == {"moe", "loss", "deepspeed", "data", "model"}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    extra = ["data.source=corpus.jsonl"] if (group, option) == ("data", "jsonl") else []
    cfg = _compose([f"{group}={option}", *extra])
    assert isinstance(cfg, TrainConfig)


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


def test_every_router_field_the_readme_names_is_settable():
    """moe.bias_update_rate reaches the router; a bad value names the recipe key."""
    from moespec.routing import LossConfig

    cfg = _compose(["moe.score_bias=true", "moe.bias_update_rate=0.05"])
    assert cfg.moe.router_config(LossConfig()).bias_update_rate == 0.05
    bad = _compose(["moe.bias_update_rate=-1"])
    with pytest.raises(ValueError, match="moe.bias_update_rate must be a finite number >= 0"):
        bad.moe.validate()
