"""Faults in whole training runs: a NaN micro-batch, preemption by SIGTERM, a killed rank
(DeepSpeed launcher, 2 ranks, expert parallel) and two torchrun "nodes" on 127.0.0.1."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from moespec.train import checkpoint as ckpt
from moespec.train.launch import deepspeed_launcher, free_port
from tests.common import ROOT

FAST = [
    "experiment=smoke",
    "trainer.progress=false",
    "trainer.plot_every=100",
    "trainer.eval_every=100",
    "trainer.log_every=1",
    "wandb.enabled=false",
]
EP = [*FAST, "moe=deepspeed", "moe.ep_size=2", "trainer.max_steps=10", "trainer.save_every=2"]

pytestmark = [pytest.mark.slow, pytest.mark.multiproc, pytest.mark.timeout(3600)]


def _rows(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(ln) for ln in lines if ln.strip().endswith("}")]
    return {r["step"]: r for r in rows if "alert" not in r}


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if rank is not None and "moespec.train" in line and "launch" not in line:
            found.append((int(rank), child))
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def _launch(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 900
    while max(_rows(run_dir), default=0) < step:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.05)


def _same_losses(want: dict[int, dict], got: dict[int, dict]) -> None:
    assert sorted(want) == sorted(got)
    for step in want:
        assert math.isclose(got[step]["train/loss"], want[step]["train/loss"], abs_tol=1e-6), step


def _states(ckpt: Path) -> dict:
    model = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    optim = torch.load(next(ckpt.glob("*optim_states.pt")), weights_only=False)
    return {**model, **{f"optim/{k}": v for k, v in _flat(optim["optimizer_state_dict"]).items()}}


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}/{key}").items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}/{i}").items()}
    return {}


def test_nan_micro_batch_skips_exactly_its_step(run_train, tmp_path):
    """The step with the NaN leaves weights and optimizer states as they were; the run goes on."""
    run = tmp_path / "skip"
    args = [*FAST, "trainer.nonfinite=skip", "trainer.save_every=1", "trainer.keep_checkpoints=0"]
    faults = {"MOESPEC_FAULTS": "nan:micro:3"}
    proc = run_train([*args, f"hydra.run.dir={run}"], env=faults, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = {s: _states(run / "checkpoints" / f"step{s:08d}") for s in (2, 3, 4)}
    assert ck[2].keys() == ck[3].keys()
    assert all(torch.equal(ck[2][k], ck[3][k]) for k in ck[2])  # nothing moved at step 3
    assert not all(torch.equal(ck[3][k], ck[4][k]) for k in ck[3])  # step 4 trained
    assert all(torch.isfinite(v).all() for v in ck[4].values() if v.is_floating_point())
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in lines if "alert" in r] == [
        {"step": 3, "alert": "optimizer step 3 skipped: non-finite loss"}
    ]
    assert lines[-1]["train/skipped_steps"] == 1.0 and "train/loss" not in _rows(run)[3]
    # The default stops at the NaN; too many skips in a row stop a skipping run.
    for extra, faults, needle in [
        ([], "nan:micro:3", "non-finite loss at step 3"),
        (["trainer.nonfinite=skip", "trainer.max_skipped_steps=1"], "nan:micro:3,nan:micro:4",
         "2 optimizer steps in a row skipped (trainer.max_skipped_steps=1), the last at step 4"),
    ]:  # fmt: skip
        proc = run_train(
            [*FAST, *extra, f"hydra.run.dir={tmp_path / 'stop'}"],
            env={"MOESPEC_FAULTS": faults},
            timeout=1800,
        )
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[
            -3000:
        ]


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(train_env, tmp_path):
    """SIGTERM to both ranks (twice, as a scheduler may): step finished, checkpoint, exit 75."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    launcher = [*deepspeed_launcher(2), "moespec.train", *EP]
    proc = _launch([*launcher, f"hydra.run.dir={ref}"], train_env, tmp_path / "ref.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    proc = _launch([*launcher, f"hydra.run.dir={run}"], train_env, tmp_path / "run.log")
    _wait_for_step(proc, run, 3)
    for sig in (signal.SIGTERM, signal.SIGTERM):
        for rank in _ranks(proc):
            rank.send_signal(sig)
        time.sleep(0.2)
    assert proc.wait(timeout=900) == 75, (tmp_path / "run.log").read_text()[-3000:]
    logged = _rows(run)
    stop = max(logged)
    assert (run / "checkpoints" / f"step{stop:08d}" / "COMPLETE").is_file() and stop < 10
    # the second SIGTERM lands in the checkpoint (logged, ignored) or in the shutdown (SIG_IGN);
    # either way the exit code stays 75 (the handler's message: test_reliability.py)
    cmd = [*launcher, "trainer.resume=auto", f"hydra.run.dir={run}"]
    proc = _launch(cmd, train_env, tmp_path / "resume.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    got = _rows(run)
    assert all(got[s] == logged[s] for s in logged)  # nothing logged before the stop is lost
    _same_losses(_rows(ref), got)


def test_a_signal_during_setup_exits_75_before_the_first_step(run_train, tmp_path):
    """SIGTERM once the engine is built: no step trained, nothing saved, exit 75; resume runs."""
    run = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=4", "trainer.save_every=2", f"hydra.run.dir={run}"]
    proc = run_train(args, env={"MOESPEC_FAULTS": "sigterm:setup:0"}, timeout=1800)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "SIGTERM received" in proc.stdout + proc.stderr
    assert not _rows(run) and not ckpt.complete_checkpoints(run / "checkpoints")
    proc = run_train([*args, "trainer.resume=auto"], timeout=1800)
    assert proc.returncode == 0 and sorted(_rows(run)) == [1, 2, 3, 4], proc.stderr[-3000:]


def test_a_killed_rank_ends_the_job_within_the_timeout(train_env, tmp_path):
    """SIGKILL of rank 1: rank 0 is gone within collective_timeout_s + 30 s; resume=auto works."""
    run, timeout_s = tmp_path / "run", 120
    args = [*EP, f"trainer.collective_timeout_s={timeout_s}", f"hydra.run.dir={run}"]
    proc = _launch([*deepspeed_launcher(2), "moespec.train", *args], train_env, tmp_path / "a.log")
    _wait_for_step(proc, run, 5)
    rank0, rank1 = _ranks(proc)
    rank1.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rank0.wait(timeout=timeout_s + 30)
    assert time.monotonic() - killed < timeout_s + 30
    assert proc.wait(timeout=60) != 0
    complete = sorted(p.parent.name for p in (run / "checkpoints").glob("step*/COMPLETE"))
    cmd = [
        *deepspeed_launcher(2),
        "moespec.train",
        *EP,
        "trainer.resume=auto",
        f"hydra.run.dir={run}",
    ]
    proc = _launch(cmd, train_env, tmp_path / "b.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert f"resumed from {run / 'checkpoints' / complete[-1]}" in (tmp_path / "b.log").read_text()
    assert sorted(_rows(run)) == list(range(1, 11))


def test_two_torchrun_nodes_train_survive_a_lost_node_and_resume(train_env, tmp_path):
    """Two agents (--nnodes 2, one rank each) on a c10d rendezvous at 127.0.0.1."""
    run, timeout_s = tmp_path / "run", 120
    torchrun = str(Path(sys.executable).parent / "torchrun")

    def nodes(extra: list[str], tag: str) -> list[subprocess.Popen]:
        port = free_port()
        return [
            _launch(
                [
                    torchrun,
                    "--nnodes",
                    "2",
                    "--node_rank",
                    str(node),
                    "--nproc_per_node",
                    "1",
                    "--rdzv_backend",
                    "c10d",
                    "--rdzv_endpoint",
                    f"127.0.0.1:{port}",
                    "--rdzv_id",
                    tag,
                    "--rdzv_conf",
                    f"is_host={int(node == 0)}",  # node 0 holds the store, as a cluster's head
                    "--max_restarts",
                    "0",
                    "-m",
                    "moespec.train",
                    *EP,
                    f"trainer.collective_timeout_s={timeout_s}",
                    f"hydra.run.dir={run}",
                    *extra,
                ],
                train_env,
                tmp_path / f"{tag}-node{node}.log",
            )  # fmt: skip
            for node in (0, 1)
        ]

    first = nodes([], "first")
    _wait_for_step(first[0], run, 5)
    lost = psutil.Process(first[1].pid)
    for p in [*lost.children(recursive=True), lost]:
        p.send_signal(signal.SIGKILL)  # the whole "node": agent and worker
    killed = time.monotonic()
    assert first[0].wait(timeout=timeout_s + 30) != 0
    ended_s = time.monotonic() - killed
    assert ended_s < timeout_s + 30
    logged = _rows(run)
    newest = ckpt.latest_checkpoint(run / "checkpoints")
    assert newest is not None
    second = nodes(["trainer.resume=auto"], "second")
    for node, proc in enumerate(second):
        log = tmp_path / f"second-node{node}.log"
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    logs = "".join((tmp_path / f"second-node{n}.log").read_text() for n in (0, 1))
    assert f"resumed from {newest}" in logs
    got = _rows(run)
    assert sorted(got) == list(range(1, 11))
    resumed = int(newest.name[4:])
    assert all(got[s] == logged[s] for s in logged if s <= resumed)  # nothing logged is lost
    assert (run / "checkpoints" / "step00000010" / "COMPLETE").is_file()
    print(
        f"two nodes: the other node ended {ended_s:.1f} s after the kill (collective_timeout_s="
        f"{timeout_s}); {max(logged)} steps logged, resumed from step {resumed} to step 10"
    )
