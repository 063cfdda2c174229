"""Starting training processes: a free rendezvous port and the DeepSpeed launcher's command line."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


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
