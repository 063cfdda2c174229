"""The balance budget and the collapse alarm in real training runs: the issue's collapsed HF
run raises the alarm and the default loss does not; the yields are logged, checkpointed and
continue bit for bit on resume; a resume with another budget stops before any step."""

from __future__ import annotations

import json

import pytest

HF_TINY = [
    "experiment=qwen3_moe_tiny", "trainer.max_steps=40", "trainer.log_every=2",
    "trainer.eval_every=100", "trainer.save_every=0", "trainer.plot_every=100",
    "trainer.progress=false", "wandb.enabled=false",
]  # fmt: skip
#: The weights loss=specialization calibrated to before the budget (the issue's collapse).
COLLAPSING = [
    "loss=specialization", "loss.orthogonality.variant=projection",
    "loss.orthogonality.weight=10", "loss.variance.weight=1", "loss.balance.max_maxvio=null",
]  # fmt: skip


def _alerts(run_dir) -> list[str]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["alert"] for r in rows if "alert" in r]


@pytest.mark.multiproc
@pytest.mark.parametrize("loss,collapses", [(COLLAPSING, True), (["loss=specialization"], False)])
def test_collapse_alarm_on_a_collapsed_and_a_healthy_run(
    run_train, read_metrics, tmp_path, loss, collapses
):
    run_dir = tmp_path / "run"
    proc = run_train([*HF_TINY, *loss, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in read_metrics(run_dir) if "routing/relative_maxvio" in r]
    worst = max(r["routing/relative_maxvio"] for r in rows[-5:])
    alerts = [a for a in _alerts(run_dir) if "routing collapse" in a]
    if collapses:
        assert worst > 0.9  # two experts of four take (nearly) every token
        assert alerts, "the collapsed run raised no alarm"
    else:
        assert worst < 0.75 and not alerts, alerts
        assert all(r["routing/dead_experts"] == 0 for r in rows)


@pytest.mark.multiproc
def test_budget_yields_and_continues_on_resume(run_train, read_metrics, tmp_path):
    """A budget below any real imbalance makes the variance weight yield every step; a run
    stopped and resumed logs the same weights, yields and losses as one that never stopped."""
    args = [
        "experiment=smoke", "loss=specialization", "loss.balance.max_maxvio=0.01",
        "loss.variance.weight=0.05", "trainer.max_steps=8", "trainer.log_every=1",
        "trainer.save_every=4", "trainer.eval_every=100", "trainer.plot_every=100",
        "trainer.progress=false", "wandb.enabled=false",
    ]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_train([*args, f"hydra.run.dir={whole}"]).returncode == 0
    first = run_train([*args, "trainer.stop_after=4", f"hydra.run.dir={parts}"])
    assert first.returncode == 0, first.stderr[-4000:]
    wrong = run_train(
        [*args, "loss.balance.max_maxvio=0.5", "trainer.resume=auto", f"hydra.run.dir={parts}"]
    )
    assert wrong.returncode == 2
    line = wrong.stderr.strip().splitlines()[-1]
    assert "loss.balance.max_maxvio=0.5" in line and "trained with 0.01" in line, line
    assert max(r["step"] for r in read_metrics(parts)) == 4  # stopped before any step
    resumed = run_train([*args, "trainer.resume=auto", f"hydra.run.dir={parts}"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a = {r["step"]: r for r in read_metrics(whole) if "train/loss" in r}
    b = {r["step"]: r for r in read_metrics(parts) if "train/loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    yields = [a[s]["balance/yield"] for s in range(1, 9)]
    # In force during step s: steered after each of the s - 1 steps before (rate 0.1).
    assert yields == pytest.approx([0.9048374180359595 ** (s - 1) for s in range(1, 9)], rel=1e-9)
    for step in range(1, 9):
        for key in ("weights/variance", "balance/yield", "train/loss", "loss_share/variance"):
            assert b[step][key] == a[step][key], (step, key)
    assert a[8]["weights/variance"] == pytest.approx(0.05 * yields[-1], rel=1e-9)
