"""Worker: one rank reducing a MetricWindow whose entries differ between ranks.

Usage: torchrun --nproc_per_node 2 tests/workers/metric_window.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moespec.routing.metrics import MetricWindow


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    w = MetricWindow()
    w.add("loss", 1.0 + rank, "mean")  # rank 0: 1, rank 1: 2 and 4 -> (1 + 2 + 4) / 3
    if rank == 1:
        w.add("loss", 4.0, "mean")
        w.add("only_rank1", 5.0, "sum")
    w.add("tokens", 10 * (rank + 1), "sum")
    w.add("peak", 3.0 - rank, "max")
    w.add("per_token", 0.5 * (rank + 1), "mean", count=2 + rank)  # (1 + 3) / 5
    w.add("counts", torch.ones(2 + rank, 1 + rank), "sum")  # [2,1] and [3,2]: padded to [3,2]
    w.all_reduce()
    torch.save(w.values(), out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
