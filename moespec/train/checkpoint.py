"""Checkpoints: DeepSpeed engine state plus moespec's own, complete only once marked so.

A checkpoint is the directory ``<run>/checkpoints/step{N:08d}``. DeepSpeed writes its
model/optimizer shards there; every rank adds its RNG states; rank 0 writes the trainer
state and, after a barrier, the ``COMPLETE`` marker (atomically, last). Resumption only
ever considers directories that carry the marker, so a write interrupted at any point is
never taken as a checkpoint; old checkpoints are deleted only after the marker of the new one.
A write error on any rank (a full disk) is agreed by all ranks and raised as one
:class:`CheckpointSaveError`; the incomplete directory is removed. Every file is read back with
:func:`~moespec.train.safe_load.safe_torch_load`, which never runs code from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..cache import as_umask_allows
from ..distributed import all_reduce_floats
from . import faults
from .safe_load import CheckpointFileError, is_safe_engine, safe_torch_load

MARKER = "COMPLETE"
PREFIX = "step"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk.

    Some network and FUSE filesystems refuse to fsync a directory; that is not an error here.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file below ``root`` and the directories holding them."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                fsync_path(Path(dirpath) / name)
            except FileNotFoundError:  # replaced meanwhile (the new file is flushed by its writer)
                continue
        fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and ``os.replace``; durable on return."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        as_umask_allows(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file and ``os.replace``; flushed to disk."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        fsync_path(Path(tmp))
        as_umask_allows(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a write error); one line."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states of this process, as tensors and plain data."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()},
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
        np_state = {**np_state, "state": {**np_state["state"], "key": key}}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(obj: Any) -> Any:
    """``random.setstate`` wants tuples where a loaded state may hold lists."""
    return tuple(_as_tuples(v) for v in obj) if isinstance(obj, list | tuple) else obj


def tag_for(step: int) -> str:
    """Checkpoint directory name for ``step``."""
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a collective)."""
    return all_reduce_floats([float(flag)], op="max")[0] > 0


def _written(path: Path, write: Any) -> OSError | None:
    """Run ``write()`` between the fault points of ``path``; its write error, if any."""
    try:
        faults.point(f"before-{path.name}")
        write()
        faults.point(f"after-{path.name}")
    except OSError as err:
        return err
    except RuntimeError as err:  # torch's zip writer reports a failed write as RuntimeError
        return OSError(str(err).splitlines()[0])
    return None


def _agree(error: OSError | None, path: Path, ckpt_root: Path) -> None:
    """Raise on every rank if any rank failed to write; rank 0 removes the incomplete files."""
    if not _any_rank(error is not None):
        return
    _barrier()
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    _barrier()
    latest = latest_checkpoint(ckpt_root)
    what = error if error is not None else "another rank failed to write its part"
    raise CheckpointSaveError(
        f"could not write checkpoint {path}: {what}; the previous complete checkpoint is "
        f"kept: {latest or 'none'}"
    )


def save_checkpoint(
    engine: Any,
    ckpt_root: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Save engine + trainer state for ``step``; marks it complete last; prunes old ones.

    ``rank_state`` is this rank's own state (beside its RNG states), given back by
    :func:`load_checkpoint` as ``trainer_state["rank"]``. A write error on any rank raises
    :class:`CheckpointSaveError` on every rank.
    """
    rank = _rank()
    path = ckpt_root / tag_for(step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete leftover of the same step
    _barrier()
    safe = engine.checkpoint_engine if is_safe_engine(engine.checkpoint_engine) else None
    if safe is not None:
        safe.error = None
    engine.save_checkpoint(
        str(ckpt_root), tag=path.name, client_state={"moespec": trainer_state}, save_latest=False
    )
    error = safe.error if safe is not None else None
    if error is None:
        path.mkdir(parents=True, exist_ok=True)
        own = {"rng": rng_state(), **(rank_state or {})}
        rank_file = path / f"rank{rank}_state.pt"
        error = _written(rank_file, lambda: atomic_torch_save(own, rank_file))
    _agree(error, path, ckpt_root)
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:  # one process per node flushes the tree
        error = _written(path / ".fsync", lambda: fsync_tree(path))
    _agree(error, path, ckpt_root)
    if rank == 0:
        text = json.dumps(_jsonable(trainer_state), indent=2)
        error = _written(
            path / "trainer_state.json",
            lambda: atomic_write_text(path / "trainer_state.json", text),
        )
        error = error or _written(
            path / MARKER, lambda: atomic_write_text(path / MARKER, f"step {step}\n")
        )
    _agree(error, path, ckpt_root)
    if rank == 0 and keep > 0:  # only now that the new one is complete
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def run_layout(cfg: Any, world: int) -> dict[str, Any]:
    """What the sharding of a checkpoint depends on: ranks, expert parallelism, ZeRO stage."""
    return {
        "world_size": world,
        "ep_size": cfg.moe.ep_size,
        "moe_backend": cfg.moe.backend,
        "zero_stage": cfg.deepspeed.zero_stage,
    }


def saved_layout(path: Path) -> dict[str, Any] | None:
    """The layout the checkpoint at ``path`` recorded (None: saved before layouts were)."""
    state_file = path / "trainer_state.json"
    return json.loads(state_file.read_text()).get("layout") if state_file.is_file() else None


def check_layout(path: Path, current: dict[str, Any]) -> bool:
    """Whether the checkpoint at ``path`` must be loaded through DeepSpeed's universal format:
    a DeepSpeed AutoEP run saved at another ``moe.ep_size`` on as many ranks. ``ValueError``
    naming what differs for any other layout than ``current`` (:func:`run_layout`); checkpoints
    from before the layout was recorded are left to DeepSpeed's own checks."""
    saved = saved_layout(path)
    if not saved:
        return False
    differs = {k: v for k, v in current.items() if saved.get(k) != v}
    if not differs:
        return False
    autoep = saved.get("moe_backend") == current["moe_backend"] == "autoep"
    if set(differs) == {"ep_size"} and autoep:
        return True
    text = ", ".join(f"{k}={saved.get(k)} (this run: {v})" for k, v in differs.items())
    raise ValueError(
        f"checkpoint {path} was saved with {text}; resume it with the layout it was saved at "
        "(only a moe.backend=autoep run may change moe.ep_size, on as many ranks), or start a "
        "new run from its weights (a Hugging Face run's hf_model/ as model.name_or_path)"
    )


def universal_copy(path: Path, out_root: Path) -> Path:
    """DeepSpeed's universal checkpoint of ``path`` (rank 0 converts it once, into
    ``out_root/<tag>``, published whole), with moespec's own files beside it; every rank
    returns its path. DeepSpeed loads it at another expert-parallel size."""
    out = out_root / path.name
    error = None
    if _rank() == 0 and not (out / MARKER).is_file():
        staging = out_root / f".{path.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        cmd += ["--input_folder", str(path), "--output_folder", str(staging)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = " ".join((proc.stderr or proc.stdout).split()[-40:])
            error = f"DeepSpeed could not convert {path} to its universal format: {tail}"
        else:
            for own in [*path.glob("rank*_state.pt"), path / "trainer_state.json", path / MARKER]:
                shutil.copy2(own, staging / own.name)
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)
    if _any_rank(error is not None):
        raise ValueError(error or f"rank 0 could not convert {path} to the universal format")
    _barrier()
    return out


def load_checkpoint(engine: Any, path: Path) -> dict[str, Any]:
    """Load engine state from a complete checkpoint; returns the trainer state.

    A tampered or truncated file is a :class:`~moespec.train.safe_load.CheckpointFileError`
    naming it, raised before anything of it is run.
    """
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    if not is_safe_engine(engine.checkpoint_engine):
        raise CheckpointFileError(
            f"refusing to load {path}: the engine's checkpoint engine does not load safely"
        )
    try:
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not fit this run: {_state_dict_mismatch(err)}; "
            "was it written by another recipe or another moespec version?"
        ) from None
    if client is None:
        raise CheckpointFileError(f"DeepSpeed found no checkpoint it could load in {path}")
    rank = _rank()
    state = dict(client["moespec"])
    rank_file = path / f"rank{rank}_state.pt"
    rank_state = safe_torch_load(rank_file) if rank_file.is_file() else {}
    older = path / f"rng_rank{rank}.pt"  # checkpoints of earlier versions: RNG states only
    if not rank_state and older.is_file():
        rank_state = {"rng": safe_torch_load(older)}
    if "rng" in rank_state:
        set_rng_state(rank_state.pop("rng"))
    state["rank"] = rank_state
    return state


def set_aside_newer(ckpt_root: Path, resume_from: Path) -> list[Path]:
    """Move complete checkpoints newer than ``resume_from`` into ``superseded/``; delete
    incomplete ones (writes cut short, never resumable).

    Resuming from an older step starts a new history: left in place, the abandoned newer
    checkpoints would win ``resume=auto`` and outlive the new ones when old ones are pruned.
    Returns where the complete ones went.
    """
    if resume_from.parent.resolve() != ckpt_root.resolve():
        return []
    newer = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    newer = sorted(p for p in newer if p.name > resume_from.name)
    for p in [p for p in newer if not (p / MARKER).is_file()]:
        shutil.rmtree(p, ignore_errors=True)
    complete = [p for p in newer if (p / MARKER).is_file()]
    if not complete:
        return []
    (ckpt_root / "superseded").mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=ckpt_root / "superseded"))
    moved = []
    for p in complete:
        p.rename(aside / p.name)
        moved.append(aside / p.name)
    fsync_path(ckpt_root)
    return moved


def _state_dict_mismatch(err: RuntimeError) -> str:
    """``load_state_dict``'s long list of key names as counts and a first example."""
    parts = []
    for line in str(err).splitlines():
        line = line.strip()
        for label in ("Missing key(s)", "Unexpected key(s)"):
            if line.startswith(label):
                keys = line.split(":", 1)[1].split(", ")
                parts.append(
                    f"{len(keys)} {label.lower().replace('(s)', 's')} (e.g. {keys[0].strip()})"
                )
        if line.startswith("size mismatch"):
            parts.append(line.rstrip("."))
    return "; ".join(parts[:3]) or str(err).splitlines()[0]


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """``none`` → None; ``auto`` → newest complete checkpoint (or None); else a checkpoint path."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such checkpoint directory")
    if not (path / MARKER).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"trainer.resume={resume!r} holds no complete checkpoint")
        return latest
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)
