"""Checkpoint faults on a real DeepSpeed engine (one process): ``python ckpt_faults.py MODE DIR``.

MODE ``checks``: injected ENOSPC at every file of a save, tampered (pickle payload) and
truncated files of every kind. MODE ``kill``: save step 1, then die inside the save of step 2
where ``MOESPEC_FAULTS`` says. MODE ``resume``: what ``trainer.resume=auto`` does, then save.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moespec.train import checkpoint as ckpt
from moespec.train import faults, safe_load
from moespec.train.builders import build_engine
from moespec.train.config import TrainConfig
from moespec.train.launch import init_distributed
from moespec.train.safe_load import CheckpointFileError

SMOKE = {
    "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 16}},
    "moe": {"backend": "deepspeed", "num_experts": 4, "top_k": 2, "ffn_size": 32},
    "data": {"seq_len": 16, "vocab_size": 64},
    "deepspeed": {"micro_batch_size": 2},
}
FILES = [
    "mp_rank_00_model_states.pt",
    "layer_0_expert_3_mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rank0_state.pt",
    "trainer_state.json",
    "COMPLETE",
]


class Payload:
    """Unpickled with ``weights_only=False``, this creates the directory ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def engine():
    init_distributed()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), SMOKE))
    eng, _, _ = build_engine(cfg, 64)
    safe_load.install(eng)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    eng.backward(eng(ids, ids).loss)
    eng.step()
    return eng


def save(eng, root: Path, step: int, keep: int = 1) -> Path:
    faults.set_step(step)
    state = {"step": step, "sampler": {"epoch": 0}, "loss_weights": {}}
    return ckpt.save_checkpoint(eng, root, step, state, keep, {"callbacks": {"x": [1.0, 2.0]}})


def arm(spec: str) -> None:
    os.environ[faults.ENV] = spec
    faults.configure(0)


def checks(root: Path) -> None:
    eng = engine()
    first = save(eng, root, 1)
    assert ckpt.complete_checkpoints(root) == [first] and first.name == "step00000001"
    assert set(FILES) <= {p.name for p in first.iterdir()}, sorted(os.listdir(first))
    for name in FILES:  # a full disk at each file: one error, the previous checkpoint kept
        arm(f"enospc:before-{name}:2")
        try:
            save(eng, root, 2)
        except ckpt.CheckpointSaveError as err:
            text = str(err)
            assert "No space left on device" in text and name in text, text
            assert f"kept: {first}" in text, text
        else:
            raise AssertionError(f"no error for ENOSPC at {name}")
        assert ckpt.complete_checkpoints(root) == [first] and not (root / "step00000002").exists()
    arm("")
    second = save(eng, root, 2)
    assert ckpt.complete_checkpoints(root) == [second]  # retention after the new one completed
    state = ckpt.load_checkpoint(eng, second)
    assert state["step"] == 2 and state["rank"]["callbacks"] == {"x": [1.0, 2.0]}
    sentinel = root.parent / "payload-ran"
    for name in [n for n in FILES if n.endswith(".pt")]:
        bad = root / f"step0000010{FILES.index(name)}"
        shutil.copytree(second, bad)
        obj = torch.load(bad / name, weights_only=False)
        obj["planted"] = Payload(str(sentinel))
        torch.save(obj, bad / name)
        expect(eng, bad, bad / name, "other than tensors and plain data")
        assert not sentinel.exists(), f"the payload in {name} ran"
        data = (second / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2])
        expect(eng, bad, bad / name, "truncated or corrupt")
    print("ok checks")


def expect(eng, path: Path, file: Path, needle: str) -> None:
    try:
        ckpt.load_checkpoint(eng, path)
    except CheckpointFileError as err:
        assert str(file) in str(err) and needle in str(err), str(err)
        assert "\n" not in str(err)
    else:
        raise AssertionError(f"{file} loaded")


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    if mode == "checks":
        checks(root)
    elif mode == "kill":
        eng = engine()
        faults.configure(0)
        save(eng, root, 1, keep=1)
        save(eng, root, 2, keep=1)
        print("not killed")
    elif mode == "resume":
        eng = engine()
        latest = ckpt.resolve_resume("auto", root)
        ckpt.set_aside_newer(root, latest)
        state = ckpt.load_checkpoint(eng, latest)
        save(eng, root, state["step"] + 1, keep=1)
        print(f"ok resumed {state['step']}")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
