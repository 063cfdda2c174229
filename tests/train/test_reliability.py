"""Reliability pieces in one process: the step guard, fault injection, preemption signals,
safe loading of checkpoint files and the RNG states they carry."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from moespec.train import checkpoint as ckpt
from moespec.train import faults
from moespec.train.config import TrainerConfig
from moespec.train.guard import StepGuard
from moespec.train.preempt import PreemptionHandler, parse_signals
from moespec.train.safe_load import CheckpointFileError, safe_torch_load


class Payload:
    """Unpickled with ``weights_only=False``, this creates the directory ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_spike_guard_matches_a_running_median_loop():
    rng = np.random.default_rng(0)
    losses = list(3 + 0.1 * rng.standard_normal(200))
    for i in (1, 30, 31, 90, 150):  # step 1: before the window is full, not a spike
        losses[i] *= 4
    guard, accepted, got, want = StepGuard("error", 2.5, 10, 3), [], [], []
    for loss in losses:
        ref = len(accepted) >= 10 and loss > 2.5 * float(np.median(accepted[-10:]))
        want.append(ref)
        cause = guard.cause(loss)
        got.append(cause is not None)
        if cause is None:
            guard.accept(loss)
            accepted.append(loss)
        else:
            assert cause.startswith("loss spike") and f"{loss:.4g}" in cause
    assert got == want and [i for i, s in enumerate(got) if s] == [30, 31, 90, 150]
    assert StepGuard("skip", 0.0, 10, 3).cause(1e30) is None  # no spike guard when 0
    assert guard.cause(float("nan")) == "non-finite loss"


def test_guard_counts_skips_in_a_row_and_round_trips():
    guard = StepGuard("skip", 0.0, 4, 2)
    assert [guard.step_done(s) for s in (True, True, False, True, True, True)] == [
        False, False, False, False, False, True,
    ]  # fmt: skip
    assert (guard.in_a_row, guard.total) == (3, 5)
    for v in (1.0, 2.0):
        guard.accept(v)
    again = StepGuard("skip", 0.0, 4, 2)
    again.load_state_dict(guard.state_dict())
    assert again.state_dict() == guard.state_dict() == {
        "history": [1.0, 2.0], "in_a_row": 3, "total": 5,
    }  # fmt: skip


def test_faults_fire_once_where_and_when_named(monkeypatch):
    with pytest.raises(ValueError, match="expected KIND:POINT:STEP"):
        faults.parse("explode:step:3")
    with pytest.raises(ValueError, match="STEP and RANK must be integers"):
        faults.parse("kill:step:x")
    monkeypatch.setenv(faults.ENV, "enospc:before-*optim_states.pt:2:1,nan:micro:3")
    faults.configure(rank=1)
    try:
        faults.set_step(1)
        faults.point("before-zero_pp_rank_1_mp_rank_00_optim_states.pt")  # wrong step
        faults.set_step(2)
        faults.point("before-mp_rank_00_model_states.pt")  # wrong file
        with pytest.raises(OSError, match="No space left on device") as err:
            faults.point("before-zero_pp_rank_1_mp_rank_00_optim_states.pt")
        assert err.value.errno == 28
        faults.point("before-zero_pp_rank_1_mp_rank_00_optim_states.pt")  # fired once
        assert not faults.nan_due()
        faults.set_step(3)
        assert faults.nan_due() and not faults.nan_due()
        faults.configure(rank=0)
        faults.set_step(2)
        faults.point("before-zero_pp_rank_1_mp_rank_00_optim_states.pt")  # other rank
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.configure(rank=0)


def test_preemption_handler_notes_the_first_signal_and_ignores_the_next(caplog):
    handler = PreemptionHandler(["SIGUSR1", "usr2"])
    assert handler.signals == [signal.SIGUSR1, signal.SIGUSR2]
    before = signal.getsignal(signal.SIGUSR1)
    handler.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        handler.uninstall()
    assert handler.received == "SIGUSR2"
    assert "SIGUSR1 received while stopping for SIGUSR2: ignored" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) == before
    handler.ignore_from_now()  # after the preemption checkpoint, until the process exits
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end the test process
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before)
        signal.signal(signal.SIGUSR2, before)
    with pytest.raises(ValueError, match="'SIGKILL' is not a signal that can be caught"):
        parse_signals(["SIGKILL"])


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("nonfinite", "maybe", "trainer.nonfinite='maybe'; valid: error, skip"),
        ("spike_factor", 0.5, "trainer.spike_factor must be 0 (off) or > 1"),
        ("preempt_signals", ["SIGNOPE"], "'SIGNOPE' is not a signal"),
        ("preempt_exit_code", 0, "trainer.preempt_exit_code must be in 1..255"),
        ("collective_timeout_s", 0.0, "trainer.collective_timeout_s must be > 0"),
        ("max_skipped_steps", -1, "trainer.max_skipped_steps must be >= 0"),
    ],
)
def test_bad_reliability_settings_are_one_clear_error(field, value, needle):
    cfg = TrainerConfig(**{field: value})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert needle in str(err.value)
    TrainerConfig().validate()


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    sentinel, path = tmp_path / "payload-ran", tmp_path / "rank0_state.pt"
    torch.save({"rng": torch.zeros(3), "planted": Payload(str(sentinel))}, path)
    with pytest.raises(CheckpointFileError) as err:
        safe_torch_load(path)
    assert str(path) in str(err.value) and "other than tensors and plain data" in str(err.value)
    assert not sentinel.exists()
    torch.load(path, weights_only=False)  # the reference: a plain load runs it
    assert sentinel.is_dir()
    with open(tmp_path / "legacy.pt", "wb") as fh:  # the pre-zip format is checked as well
        pickle.dump({"planted": Payload(str(tmp_path / "legacy-ran"))}, fh)
    with pytest.raises(CheckpointFileError, match="legacy.pt"):
        safe_torch_load(tmp_path / "legacy.pt")
    assert not (tmp_path / "legacy-ran").exists()


def test_truncated_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.randn(64, 64)}}, path)
    assert torch.equal(safe_torch_load(path)["module"]["w"], torch.load(path)["module"]["w"])
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFileError, match="is truncated or corrupt") as err:
            safe_torch_load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointFileError, match="missing"):
        safe_torch_load(tmp_path / "nope.pt")


def test_rng_states_round_trip_through_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.atomic_torch_save({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    want = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    ckpt.set_rng_state(safe_torch_load(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == want
    # Checkpoints of earlier versions hold NumPy's legacy tuple state: allow-listed.
    np.random.seed(4)
    old = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save(old, tmp_path / "rng_rank0.pt")
    want = np.random.rand(2).tolist()
    ckpt.set_rng_state(safe_torch_load(tmp_path / "rng_rank0.pt"))
    assert np.random.rand(2).tolist() == want


def test_check_refuses_a_bad_nonfinite_mode(train_env):
    proc = subprocess.run(
        [sys.executable, "-m", "moespec.train", "--check", "trainer.nonfinite=maybe"],
        env=train_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "trainer.nonfinite='maybe'; valid: error, skip" in errors[0]


def test_resolve_inside_refuses_paths_that_escape(tmp_path):
    from moespec.paths import resolve_inside

    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    assert resolve_inside(root, "sub/a.json") == root / "sub" / "a.json"
    assert resolve_inside(root, root / "b.png") == root / "b.png"
    (root / "link").symlink_to(tmp_path)
    for bad in ("../a.json", tmp_path / "a.json", "/etc/passwd", "link/a.json", "sub/../../a"):
        with pytest.raises(ValueError, match="is outside .*: refusing to write there"):
            resolve_inside(root, bad)


@pytest.mark.parametrize(
    "command,key",
    [("identify", "output.heatmap"), ("apply", "output.answers"), ("eval", "output.report")],
)
def test_heads_cli_refuses_outputs_outside_output_dir(tmp_path, monkeypatch, capsys, command, key):
    from moespec.heads.cli import main

    out = tmp_path / "out"
    argv = ["moespec-heads", f"command={command}", "model.dir=/nonexistent", f"output.dir={out}"]
    monkeypatch.setattr(sys, "argv", [*argv, f"{key}=../escaped"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert f"error: {key}: ../escaped is outside {out}" in err[0]
    assert not (tmp_path / "escaped").exists()
