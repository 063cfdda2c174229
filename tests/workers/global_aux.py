"""Worker: one rank of the `global`-scope aux loss; saves the loss and the router gradient.

Usage: torchrun --nproc_per_node N tests/workers/global_aux.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moespec.routing import LossConfig, Router, RouterConfig
from moespec.train.launch import init_distributed

HIDDEN, EXPERTS, TOP_K, TOKENS = 12, 6, 2, 20


def main() -> None:
    out_dir = Path(sys.argv[1])
    rank, world = init_distributed()
    loss = LossConfig()
    loss.aux.scope = "global"
    torch.manual_seed(0)
    router = Router(HIDDEN, RouterConfig(num_experts=EXPERTS, top_k=TOP_K, loss=loss))
    batch = torch.randn(world, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    router(batch[rank])
    aux = router.raw_losses["aux"]
    aux.backward()
    torch.save({"aux": aux.detach(), "grad": router.weight.grad}, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
