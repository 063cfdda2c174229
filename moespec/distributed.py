"""The one place that picks a device for a collective, and the small collectives built on it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def local_device() -> torch.device:
    """This process's compute device: its CUDA device (``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must sit for a collective over ``group``: the current CUDA device under
    NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a list of floats over every rank; the values themselves on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()
