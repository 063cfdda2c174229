"""Checkpoints of a real DeepSpeed engine under faults: a full disk at each file, tampered and
truncated files of each kind, and kill -9 at each point of a save."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moespec.train import checkpoint as ckpt
from tests.common import ROOT

WORKER = ROOT / "tests" / "workers" / "ckpt_faults.py"
FILES = [
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rank0_state.pt",
    ".fsync",
    "trainer_state.json",
    "COMPLETE",
]


def _worker(train_env, mode: str, root: Path, faults: str = "") -> subprocess.CompletedProcess:
    env = {**train_env, "MOESPEC_FAULTS": faults}
    return subprocess.run(
        [sys.executable, str(WORKER), mode, str(root)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def test_full_disk_and_tampered_files_are_one_clear_error(train_env, tmp_path):
    """ENOSPC at each file keeps the previous checkpoint; a pickle payload never runs."""
    proc = _worker(train_env, "checks", tmp_path / "checkpoints")
    assert proc.returncode == 0 and "ok checks" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("point", [f"{w}-{f}" for f in FILES for w in ("before", "after")])
def test_kill_9_inside_a_save_leaves_a_resumable_directory(train_env, tmp_path, point):
    root = tmp_path / "checkpoints"
    proc = _worker(train_env, "kill", root, f"kill:{point}:2")
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    complete = [p.name for p in ckpt.complete_checkpoints(root)]
    if point == "after-COMPLETE":  # killed before pruning: both complete, the newer wins
        assert complete == ["step00000001", "step00000002"]
    else:
        assert complete == ["step00000001"], complete
    proc = _worker(train_env, "resume", root)
    step = 2 if point == "after-COMPLETE" else 1
    assert proc.returncode == 0 and f"ok resumed {step}" in proc.stdout, proc.stderr[-3000:]
    assert [p.name for p in ckpt.complete_checkpoints(root)] == [ckpt.tag_for(step + 1)]
