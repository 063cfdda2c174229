"""ZeRO stage 3 for Hugging Face MoE models: trains, exports loadable weights, refuses EP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

FAST = ["loss=specialization", "trainer.progress=false", "wandb.enabled=false"]
ROOT_ARGS = ["experiment=olmoe_tiny", "deepspeed=zero3"]  # not among DeepSpeed's default leaves


def test_zero3_trains_hf_moe_and_exports(run_train, read_metrics, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "z3"
    args = [*ROOT_ARGS, *FAST, "trainer.max_steps=8", "trainer.log_every=1", "trainer.eval_every=8"]
    args += ["trainer.activation_checkpointing=true", "optim.lr=1e-2", f"hydra.run.dir={run_dir}"]
    # every parameter partitioned, however small (ZeRO-3 keeps small ones whole by default)
    args += ["+deepspeed.extra.zero_optimization={stage: 3, stage3_param_persistence_threshold: 0}"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "are leaf modules" in (run_dir / "train.log").read_text()
    rows = [r for r in read_metrics(run_dir) if "train/lm_loss" in r]
    assert len(rows) == 8
    first, last = rows[0]["train/lm_loss"], rows[-1]["train/lm_loss"]
    assert last < first - 0.05, (first, last)
    assert all(r["loss/orthogonality"] > 0 for r in rows)
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").eval()
    ckpt = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    assert ckpt.name.endswith("8")
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    state = exported.state_dict()
    assert {f"model.{k}" for k in state} <= set(trained)
    for key, value in state.items():  # the trained weights, gathered from their partitions
        torch.testing.assert_close(value, trained[f"model.{key}"], rtol=0, atol=0, msg=key)
    init = AutoModelForCausalLM.from_config(exported.config).state_dict()
    gate = "model.layers.0.mlp.experts.gate_up_proj"
    assert state[gate].shape == init[gate].shape
    ids = torch.randint(2, 1024, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(exported(input_ids=ids).logits).all()


def _cfg(**node):
    from omegaconf import OmegaConf

    from moespec.train.config import TrainConfig

    base = {"model": {"type": "hf", "config": "model/configs/qwen3_moe_tiny.json"}}
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), base, node)
    merged.deepspeed.zero_stage = 3
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"moe": {"backend": "deepspeed"}}, "moe.backend=deepspeed"),
        ({"moe": {"backend": "deepspeed", "ep_size": 2}}, "any moe.ep_size"),
        ({"model": {"type": "tiny", "config": None}}, "model.type=tiny"),
    ],
)
def test_zero3_refuses_what_deepspeed_cannot_do(node, match):
    from moespec.train.builders import TrainingError, deepspeed_config

    with pytest.raises(TrainingError, match=match):
        deepspeed_config(_cfg(**node))
    assert deepspeed_config(_cfg())["zero_optimization"] == {"stage": 3}


def test_zero3_with_expert_parallel_is_one_line_before_any_work(train_env, tmp_path):
    cmd = [sys.executable, "-m", "moespec.train", *ROOT_ARGS, "moe=deepspeed", "moe.ep_size=2"]
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={tmp_path}"], env=train_env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "zero_stage=3 with moe.backend=deepspeed" in lines[-1], lines[-3:]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_autoep_is_refused_with_zero3():
    from types import SimpleNamespace

    from moespec.train.zero3 import zero3_problem

    cfg = SimpleNamespace(moe=SimpleNamespace(backend="autoep"), model=SimpleNamespace(type="hf"))
    assert "zero_stage=3 with moe.backend=autoep" in zero3_problem(cfg)
    cfg.moe.backend = "native"
    assert zero3_problem(cfg) is None
