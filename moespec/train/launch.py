"""Starting training processes: a free rendezvous port and the DeepSpeed launcher's command line."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on localhost that is free now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher(ranks: int, *, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N --master_port P --no_local_rank --module``, ready for a module name.

    Uses the ``deepspeed`` script beside this Python, so a virtual environment need not be active.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", str(ranks),
        "--master_port", str(port or free_port()),
        "--no_local_rank",
        "--module",
    ]  # fmt: skip


def torchrun_launcher(ranks: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node N`` for one machine, ready for a script path.

    ``--standalone`` lets torchrun bind its rendezvous port itself, so two launches started at
    once never race for a port picked beforehand.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks)]  # fmt: skip


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """Drop the name of this rank's DeepSpeed CPU allreduce buffer from ``/dev/shm``.

    With every rank on one machine (``LOCAL_SIZE`` equal to the world size, as the DeepSpeed
    launcher sets it), DeepSpeed's CPU communication maps a 66 MB shared-memory buffer per rank,
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never unlinks
    it: each run, even a killed one, leaves its buffers behind until ``/dev/shm`` fills. Call on
    every rank after a barrier that follows the process group's start, when every rank has
    mapped every buffer: the mappings stay valid and the memory is freed when the ranks exit.
    """
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        ]
    )
    with contextlib.suppress(FileNotFoundError):
        (Path("/dev/shm") / name).unlink()


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA).

    ``timeout_s`` bounds every collective of the process group: a rank left waiting for one
    that died raises instead of hanging.
    """
    from datetime import timedelta

    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        if backend == "gloo":
            if dist.get_world_size() > 1:
                dist.barrier()  # every rank has mapped every rank's buffer
            unlink_shm_allreduce_buffer(dist.get_rank())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()
