"""A checkpoint records the layout it was sharded for; resuming it at another one is refused
with one line, before anything of the run directory is moved or loaded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from moespec.train import checkpoint as ckpt
from moespec.train.launch import deepspeed_launcher, free_port

FAST = ["experiment=smoke", "trainer.progress=false", "trainer.plot_every=100"]
FAST += ["trainer.eval_every=100", "wandb.enabled=false", "trainer.save_every=2"]


def _cfg(ep_size: int, zero_stage: int = 1, backend: str = "deepspeed") -> SimpleNamespace:
    return SimpleNamespace(
        moe=SimpleNamespace(ep_size=ep_size, backend=backend),
        deepspeed=SimpleNamespace(zero_stage=zero_stage),
    )


def test_check_layout_names_every_difference(tmp_path: Path):
    saved = ckpt.run_layout(_cfg(2), world=2)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 4, "layout": saved}))
    assert ckpt.check_layout(tmp_path, ckpt.run_layout(_cfg(2), world=2)) is False  # the same
    with pytest.raises(ValueError) as err:
        ckpt.check_layout(tmp_path, ckpt.run_layout(_cfg(1, zero_stage=2), world=1))
    text = str(err.value)
    assert "world_size=2 (this run: 1), ep_size=2 (this run: 1), zero_stage=1 (this run: 2)" in text
    with pytest.raises(ValueError, match="ep_size=2 .this run: 1.; .*only a moe.backend=autoep"):
        ckpt.check_layout(tmp_path, ckpt.run_layout(_cfg(1), world=2))
    autoep = ckpt.run_layout(_cfg(2, backend="autoep"), world=2)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 4, "layout": autoep}))
    assert ckpt.check_layout(tmp_path, ckpt.run_layout(_cfg(1, backend="autoep"), world=2))
    with pytest.raises(ValueError, match="world_size=2 .this run: 1."):  # not on other ranks
        ckpt.check_layout(tmp_path, ckpt.run_layout(_cfg(1, backend="autoep"), world=1))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 4}))  # older: no layout
    assert ckpt.check_layout(tmp_path, ckpt.run_layout(_cfg(1), world=1)) is False


@pytest.mark.multiproc
def test_resuming_an_ep2_run_on_one_rank_is_refused_and_keeps_the_run(run_train, tmp_path):
    run = tmp_path / "run"
    args = [*FAST, "moe=deepspeed", "moe.ep_size=2", "trainer.max_steps=4", f"hydra.run.dir={run}"]
    proc = run_train(args, launcher=deepspeed_launcher(2, port=free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = [run / "checkpoints", run / "metrics.jsonl", run / "summary.json"]

    def files() -> dict[Path, int]:  # Hydra rewrites .hydra/ and the log on every launch
        paths = [p for k in kept for p in ([k] if k.is_file() else k.rglob("*")) if p.is_file()]
        return {p: p.stat().st_mtime_ns for p in paths}

    before = files()
    assert len(before) > 10
    args = [*FAST, "moe=deepspeed", "moe.ep_size=1", "trainer.max_steps=6", "trainer.resume=auto"]
    proc = run_train([*args, f"hydra.run.dir={run}"])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "was saved with world_size=2 (this run: 1), ep_size=2 (this run: 1)" in errors[0]
    assert files() == before
