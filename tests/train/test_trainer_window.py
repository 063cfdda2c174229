"""The trainer's logging window against its definition, and a user-defined routing loss end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.common import ROOT

WORKER = ROOT / "tests" / "workers" / "train_window.py"
EXAMPLE = ROOT / "examples" / "entropy_loss.py"


@pytest.mark.multiproc
def test_window_losses_equal_their_definition_over_ranks_and_micro_batches(
    torchrun2, train_env, tmp_path
):
    """2 ranks (expert parallel) × gradient accumulation 2 × 2 steps per window: every logged
    loss is the mean of the per-micro-batch values of all ranks, layer by layer."""
    overrides = [
        "experiment=smoke", "moe=deepspeed", "moe.ep_size=2", "loss=specialization",
        "loss.z.weight=1e-3", "deepspeed.gradient_accumulation_steps=2",
        "deepspeed.micro_batch_size=2", "trainer.max_steps=4", "trainer.log_every=2",
        "trainer.eval_every=100", "trainer.save_every=0", "trainer.progress=false",
        "wandb.enabled=false",
    ]  # fmt: skip
    cmd = [*torchrun2, str(WORKER), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    micro = [m for r in (0, 1) for m in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert len(micro) == 2 * 4 * 2  # ranks × steps × micro-batches
    rows = {
        r["step"]: r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in r
    }
    assert sorted(rows) == [2, 4]
    assert [rows[s]["user/steps_seen"] for s in (2, 4)] == [2.0, 4.0]  # a user callback logs
    names = {"aux", "orthogonality", "variance", "z"}
    for step, row in rows.items():
        window = [m for m in micro if step - 2 < m["step"] <= step]
        assert len(window) == 8
        assert row["train/loss"] == pytest.approx(np.mean([m["loss"] for m in window]), rel=1e-12)
        assert row["train/lm_loss"] == pytest.approx(np.mean([m["lm_loss"] for m in window]))
        layers = len(window[0]["per_layer"])
        for name in names:
            per_layer = [np.mean([m["per_layer"][i][name] for m in window]) for i in range(layers)]
            for i, want in enumerate(per_layer):
                assert row[f"layer{i}/loss/{name}"] == pytest.approx(want, rel=1e-12), (step, i)
            assert row[f"loss/{name}"] == pytest.approx(np.mean(per_layer), rel=1e-12), name
        # The two ranks saw different micro-batches: a rank-0-only figure would differ.
        rank0 = [m for m in micro[:8] if step - 2 < m["step"] <= step]
        assert np.mean([m["loss"] for m in rank0]) != pytest.approx(row["train/loss"], rel=1e-9)


@pytest.mark.multiproc
def test_user_loss_from_the_command_line(run_train, read_metrics, tmp_path):
    """examples/entropy_loss.py: calibrated, logged per layer and run-level, checkpointed,
    restored on resume, shown by moespec-compare; the progress is line by line in a pipe."""
    run_dir = tmp_path / "entropy"
    args = [
        "experiment=smoke", f"loss.modules=[{EXAMPLE}]", "+loss.terms.entropy.weight=auto",
        "+loss.terms.entropy.target=1e-2", "trainer.max_steps=8", "trainer.save_every=4",
        "trainer.eval_every=100", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    first = run_train([*args, "trainer.stop_after=4"])
    assert first.returncode == 0, first.stderr[-4000:]
    log = (run_dir / "train.log").read_text()
    raw = float(log.split("entropy=")[1].split("(raw ")[1].split(";")[0])
    weight = 10.0 ** round(np.log10(1e-2 / raw))
    assert "\r" not in first.stderr and "step 4/8 loss=" in log  # no bar frames in a pipe
    resumed = run_train([*args, "trainer.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (run_dir / "train.log").read_text().count("calibrated loss weights") == 1
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    for row in (r for r in rows if "train/loss" in r):
        assert row["weights/entropy"] == pytest.approx(weight)
        # The loss is the mean routing entropy: it equals the routing statistic of that name.
        assert row["loss/entropy"] == pytest.approx(row["routing/routing_entropy"], rel=1e-5)
        assert row["layer1/loss/entropy"] == pytest.approx(row["layer1/routing/routing_entropy"])
    ckpt = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    stored = [v for k, v in module.items() if k.endswith("loss_weights.entropy")]
    assert len(stored) == 2 and all(float(v) == pytest.approx(weight) for v in stored)
    table = subprocess.run(
        [sys.executable, "-m", "moespec.report.compare", str(run_dir), "--plot", str(tmp_path / "c.png")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "| entropy weight |" in table.stdout and "| entropy loss |" in table.stdout


def test_lm_loss_is_the_mean_over_the_trained_tokens_of_the_step(train_env):
    """Gradient accumulation 4 with 16, 3, 9 and 0 trained tokens per micro-batch: the step
    equals one batch of all the examples (no micro-batch reweighted, no NaN)."""
    worker = ROOT / "tests" / "workers" / "gas_tokens.py"
    proc = subprocess.run(
        [sys.executable, str(worker)], env=train_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
