"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle: unpickled with ``weights_only=False`` it can call any function.
Every checkpoint file moespec or DeepSpeed reads goes through :func:`safe_torch_load`, which
unpickles with ``weights_only=True`` (tensors, containers, numbers, strings) plus the few
DeepSpeed types of :func:`allowed_globals`; anything else, and any file cut short, is one
:class:`CheckpointFileError` naming the file. :class:`SafeCheckpointEngine` is DeepSpeed's
own checkpoint engine with that loader, and with write errors held back until every rank has
finished its part of the save (so that the ranks' collectives stay in step).
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import faults


class CheckpointFileError(ValueError):
    """A checkpoint file that is tampered with, truncated or not a checkpoint at all."""


@functools.cache
def allowed_globals() -> list[Any]:
    """The DeepSpeed classes found in its ZeRO optimizer and engine states, and NumPy arrays
    of plain dtypes (RNG states in checkpoints of earlier moespec versions)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_types = [np.ndarray, np.dtype, np._core.multiarray._reconstruct]
    numpy_types += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy_types]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and :func:`allowed_globals`; never runs code."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointFileError(f"checkpoint file {path} is missing") from None
    except pickle.UnpicklingError as err:
        raise CheckpointFileError(
            f"checkpoint file {path} holds something other than tensors and plain data "
            f"(refused, nothing of it was run): {_first_line(err)}"
        ) from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise CheckpointFileError(
            f"checkpoint file {path} is truncated or corrupt: {_first_line(err)}"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


@functools.cache
def safe_engine_class() -> type:
    """:class:`SafeCheckpointEngine`, built on first use (DeepSpeed is imported only then)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine: safe loads; a failed write is held in ``error``.

        DeepSpeed's save has barriers between its writes; a rank that raised inside it would leave
        the others waiting at them. Held back, the error is raised by
        :func:`moespec.train.checkpoint.save_checkpoint` once every rank has agreed on it.
        """

        def __init__(self, config_params: Any = None) -> None:
            super().__init__(config_params)
            self.error: OSError | None = None

        def save(self, state_dict: Any, path: str) -> None:
            if self.error is not None:
                return
            name = Path(path).name
            try:
                faults.point(f"before-{name}")
                super().save(state_dict, path)
                faults.point(f"after-{name}")
            except OSError as err:
                self.error = err
                Path(path).unlink(missing_ok=True)
            except RuntimeError as err:  # torch's zip writer reports a failed write so
                self.error = OSError(f"{path}: {str(err).splitlines()[0]}")
                Path(path).unlink(missing_ok=True)

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location)

    return SafeCheckpointEngine


def is_safe_engine(engine: Any) -> bool:
    """Whether ``engine`` is a :class:`SafeCheckpointEngine` (installed by :func:`install`)."""
    return isinstance(engine, safe_engine_class())


def install(engine: Any) -> Any:
    """Give ``engine`` a :class:`SafeCheckpointEngine` in place of DeepSpeed's torch engine."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if not isinstance(current, TorchCheckpointEngine):
        raise NotImplementedError(
            f"checkpoint engine {type(current).__name__}: moespec loads checkpoints safely only "
            "through DeepSpeed's torch checkpoint engine"
        )
    cls = safe_engine_class()
    safe = cls.__new__(cls)
    safe.__dict__.update(current.__dict__)
    safe.error = None
    engine.checkpoint_engine = safe
    return safe
