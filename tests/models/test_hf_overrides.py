"""HF model config keys from the command line (``+model.overrides.KEY=V``), and ``moe.*`` keys
that a Hugging Face model ignores refused with the model's own key to use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from moespec.models.hf import load_hf_model
from tests.common import ROOT

TINY = ROOT / "recipes" / "model" / "configs" / "qwen3_moe_tiny.json"
FAST = [
    "experiment=qwen3_moe_tiny", "trainer.max_steps=2", "trainer.log_every=2",
    "trainer.eval_every=100", "trainer.save_every=0", "trainer.progress=false",
    "wandb.enabled=false",
]  # fmt: skip


def test_overrides_set_the_config_before_the_model_is_built():
    model = load_hf_model(config_path=TINY, config_overrides={"num_experts_per_tok": 1})
    assert model.config.num_experts_per_tok == 1
    assert json.loads(TINY.read_text())["num_experts_per_tok"] == 2  # the file is untouched
    with pytest.raises(ValueError, match=r"model\.overrides\.bogus: Qwen3MoeConfig has no key"):
        load_hf_model(config_path=TINY, config_overrides={"bogus": 1})


@pytest.mark.parametrize(
    "override,expect",
    [
        ("moe.top_k=8", "moe.top_k does not apply to model.type=hf; override the model's own "
         "config instead: +model.overrides.num_experts_per_tok=8"),
        ("+model.overrides.bogus=1", "model.overrides.bogus: the model's config has no key 'bogus'"),
    ],
)  # fmt: skip
def test_check_refuses_keys_the_model_would_ignore(train_env, override, expect):
    proc = subprocess.run(
        [sys.executable, "-m", "moespec.train", "--check", "experiment=qwen3_moe_tiny", override],
        env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {expect}"), proc.stderr[-2000:]


@pytest.mark.multiproc
def test_a_run_trains_the_overridden_model_and_records_it(run_train, read_metrics, tmp_path):
    run_dir = tmp_path / "run"
    refused = run_train([*FAST, "moe.top_k=1", f"hydra.run.dir={tmp_path / 'refused'}"])
    assert refused.returncode == 2 and "+model.overrides.num_experts_per_tok=1" in refused.stderr
    proc = run_train([*FAST, "+model.overrides.num_experts_per_tok=1", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert resolved.model.overrides == {"num_experts_per_tok": 1}
    exported = json.loads((run_dir / "hf_model" / "config.json").read_text())
    assert exported["num_experts_per_tok"] == 1
    row = [r for r in read_metrics(run_dir) if "routing/output_overlap" in r][-1]
    assert row["routing/output_overlap"] == 0.0  # one expert per token: nothing to overlap


def test_check_accepts_every_key_the_build_accepts(train_env):
    """A key of the config class that its config.json leaves out is still a key to override."""
    assert "output_hidden_states" not in json.loads(TINY.read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "moespec.train", "--check", "experiment=qwen3_moe_tiny",
         "+model.overrides.output_hidden_states=false"],
        env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
