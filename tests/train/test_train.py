"""The training CLI end to end: recipe composition, logging, checkpoints, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

FAST = [
    "experiment=smoke",
    "trainer.progress=false",
    "trainer.plot_every=100",
    "trainer.eval_every=100",
]
REQUIRED_KEYS = {
    "train/loss",
    "train/lm_loss",
    "loss/aux",
    "loss/orthogonality",
    "loss/variance",
    "routing/maxvio",
    "routing/variance",
    "routing/output_overlap",
    "routing/load_cv",
    "routing/dead_experts",
    "routing/domain_mi",
}


def _model_states(run_dir: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("step*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file()
    return torch.load(ckpts[-1] / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.multiproc
def test_smoke_override_reaches_router(run_train, read_metrics, tmp_path):
    run_dir = tmp_path / "D"
    proc = run_train(
        ["experiment=smoke", "loss.orthogonality.weight=0.37", f"hydra.run.dir={run_dir}"]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["loss"]["orthogonality"]["weight"] == 0.37
    rows = read_metrics(run_dir)
    keys = set().union(*rows)
    assert keys >= REQUIRED_KEYS, REQUIRED_KEYS - keys
    assert {"layer0/routing/maxvio", "layer1/loss/orthogonality", "val/loss"} <= keys
    assert any(k.startswith("val/loss/") for k in keys)
    logged = [r["weights/orthogonality"] for r in rows if "train/loss" in r]
    assert logged and all(w == pytest.approx(0.37) for w in logged)
    # The router that trained carried 0.37: its buffer is in the checkpointed module state.
    states = _model_states(run_dir).items()
    betas = [v for k, v in states if k.endswith("loss_weights.orthogonality")]
    assert len(betas) == 2 and all(float(b) == pytest.approx(0.37) for b in betas)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert list((run_dir / "plots").glob("expert_load_step*.png"))
    assert list((run_dir / "plots").glob("expert_domain_step*.png"))


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_train_and_loss_falls(run_train, read_metrics, tmp_path, stage):
    run_dir = tmp_path / f"zero{stage}"
    proc = run_train(
        [
            *FAST,
            f"deepspeed=zero{stage}",
            "deepspeed.micro_batch_size=4",
            "trainer.max_steps=16",
            "trainer.log_every=4",
            "trainer.save_every=100",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [r["train/lm_loss"] for r in read_metrics(run_dir) if "train/lm_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses


@pytest.mark.multiproc
def test_resume_reproduces_uninterrupted_run(run_train, read_metrics, tmp_path):
    """Stopped after step 5, in the middle of a 2-step logging window, then resumed."""
    common = [
        *FAST,
        "trainer.max_steps=8",
        "trainer.log_every=2",
        "trainer.eval_every=3",
        "trainer.save_every=100",
        "loss=specialization",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_train([*common, f"hydra.run.dir={full}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train([*common, "trainer.stop_after=5", f"hydra.run.dir={part}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (part / "checkpoints" / "step00000005" / "COMPLETE").is_file()
    # A checkpoint cut short by a crash (no marker) must be ignored by resume=auto.
    broken = part / "checkpoints" / "step00000006"
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc = run_train([*common, "trainer.resume=auto", f"hydra.run.dir={part}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = {r["step"]: r for r in read_metrics(full)}
    got = {r["step"]: r for r in read_metrics(part)}
    # Evaluation runs on its own schedule (steps 3, 6 and the last), not only on log steps.
    assert [s for s in sorted(want) if "val/loss" in want[s]] == [3, 6, 8]
    assert sorted(want) == sorted(got) == [2, 3, 4, 6, 8]
    wandb_ids = {p.name.rsplit("-", 1)[1] for p in (part / "wandb").glob("offline-run-*")}
    assert len(list((part / "wandb").glob("offline-run-*"))) == 2 and len(wandb_ids) == 1
    for step in (6, 8):  # the window of step 6 spans the stop
        keys = set(want[step]) - {"train/tokens_per_s"}
        assert keys == set(got[step]) - {"train/tokens_per_s"}
        for key in keys:
            assert math.isclose(got[step][key], want[step][key], rel_tol=0, abs_tol=1e-6), (
                step,
                key,
                got[step][key],
                want[step][key],
            )
    # Resubmitting the finished job changes nothing.
    summary, rows = (part / "summary.json").read_text(), (part / "metrics.jsonl").read_text()
    proc = run_train([*common, "trainer.resume=auto", f"hydra.run.dir={part}"])
    assert proc.returncode == 0 and "already finished" in proc.stdout + proc.stderr
    assert (part / "summary.json").read_text() == summary
    assert (part / "metrics.jsonl").read_text() == rows
    # A job that died after its last checkpoint but before its summary gets the summary back.
    (part / "summary.json").unlink()
    proc = run_train([*common, "trainer.resume=auto", f"hydra.run.dir={part}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((part / "summary.json").read_text()) == json.loads(summary)
    # A checkpoint of another model is refused in one line.
    ckpt = part / "checkpoints" / "step00000008"
    other = [*FAST, "experiment=qwen3_moe_tiny", f"trainer.resume={ckpt}"]
    proc = run_train([*other, f"hydra.run.dir={tmp_path / 'other'}"])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "does not fit this run: 25 missing keys" in errors[0] and "another recipe" in errors[0]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("loss.orthogonalty.weight=1e-4", "Key 'orthogonalty' not in 'LossConfig'"),
        ("experiment=nope", "valid: deepseek_v3_tiny, demo"),
        ("data.source=/nonexistent/corpus.jsonl", "/nonexistent/corpus.jsonl"),
        ("moe.top_k=9", "moe.top_k=9"),
        ("loss.z.weight=1e38", "non-finite loss"),
        ("trainer.log_every=0", "trainer.log_every must be >= 1, got 0"),
        ("trainer.max_steps=-1", "trainer.max_steps must be >= 1, got -1"),
        ("deepspeed.micro_batch_size=0", "deepspeed.micro_batch_size must be >= 1, got 0"),
        ("moe.score_func=relu", "moe.score_func='relu'; valid: softmax, sigmoid"),
        ("data=jsonl", "data.source is empty: set data.source=PATH"),
        ("moe=megablocks", "moe.backend=megablocks needs a CUDA GPU"),
    ],
)
def test_bad_input_fails_cleanly(run_train, tmp_path, override, needle):
    run_dir = tmp_path / "bad"
    proc = run_train(
        [*FAST, "trainer.max_steps=4", "trainer.save_every=1", override, f"hydra.run.dir={run_dir}"]
    )
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():  # anything written before the failure is complete
        for c in ckpts.glob("step*"):
            assert (c / "COMPLETE").is_file(), c


def test_resume_from_an_older_step_sets_newer_checkpoints_aside(tmp_path):
    from moespec.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        ckpt.atomic_write_text(root / ckpt.tag_for(step) / ckpt.MARKER, f"step {step}\n")
    (root / ckpt.tag_for(400)).mkdir()  # a write cut short
    older = root / ckpt.tag_for(100)
    moved = ckpt.set_aside_newer(root, older)
    assert [p.name for p in moved] == [ckpt.tag_for(s) for s in (200, 300)]
    assert all((p / ckpt.MARKER).is_file() for p in moved)
    assert all(p.parent.parent == root / "superseded" for p in moved)
    assert not (root / ckpt.tag_for(400)).exists()  # never resumable: deleted, not kept
    assert ckpt.complete_checkpoints(root) == [older]
    assert ckpt.resolve_resume("auto", root) == older
    assert ckpt.set_aside_newer(root, older) == []
    (root / ckpt.tag_for(200)).mkdir()  # once more, within the same second
    ckpt.atomic_write_text(root / ckpt.tag_for(200) / ckpt.MARKER, "step 200\n")
    assert len(ckpt.set_aside_newer(root, older)) == 1
    assert len(list((root / "superseded").iterdir())) == 2
    # A checkpoint of another run directory leaves this one alone.
    other = tmp_path / "other" / ckpt.tag_for(50)
    other.mkdir(parents=True)
    assert ckpt.set_aside_newer(root, other) == []


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["experiment=demo", "loss=specialization"], 0, "ok: the recipe composes"),
        (["experiment=smoke", "moe.top_k=99"], 2, "moe.top_k=99 with moe.num_experts=4"),
        (["data=jsonl"], 2, "data.source is empty"),
        (["moe.topk=2"], 2, "(valid keys: backend, num_experts, top_k"),
        (["+moe.topk=2"], 2, "'topk' is not a field of 'MoEConfig' (valid keys: backend"),
        (["experiment=smoke", "+deepspeed.extra.wall_clock_breakdown=true"], 0, "ok:"),
        (["experiment=smoke", "--cfg", "job"], 2, "--check takes overrides only"),
    ],
)
def test_check_only_composes_and_validates(run_train, tmp_path, args, code, needle):
    proc = run_train(["--check", *args, f"hydra.run.dir={tmp_path / 'never'}"])
    assert proc.returncode == code, proc.stderr[-3000:]
    out = proc.stdout if code == 0 else proc.stderr
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], out
    assert not (tmp_path / "never").exists()


def test_metrics_log_drops_a_half_written_line(tmp_path):
    """A run killed mid-append leaves half a line; the resumed run's log stays valid JSONL."""
    from types import SimpleNamespace

    from moespec.train.logging import MetricsLogger
    from moespec.train.run_metrics import load_run

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "tra')
    logger = MetricsLogger(tmp_path, SimpleNamespace(enabled=False), {}, "run", True, resume=True)
    logger.log(3, {"train/loss": 1.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train/loss": 2.0},
        {"step": 3, "train/loss": 1.5},
    ]
    assert load_run(tmp_path).series("train/loss") == ([1, 3], [2.0, 1.5])


def test_metrics_rewind_keeps_one_history(tmp_path):
    """Resuming at step 8 after the log reached step 12: later rows move aside, none is lost."""
    from types import SimpleNamespace

    from moespec.train.logging import MetricsLogger

    rows = [{"step": s, "train/loss": 10.0 - s} for s in (4, 8, 12)] + [{"step": 12, "alert": "x"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger = MetricsLogger(tmp_path, SimpleNamespace(enabled=False), {}, "run", True, resume=True)
    assert logger.rewind(8) == 2
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aside = [
        json.loads(x) for x in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    ]
    assert kept == rows[:2] and aside == rows[2:]
    assert logger.rewind(8) == 0
