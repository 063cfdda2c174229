"""Worker: one DeepSpeed step over 4 micro-batches with different trained-token counts.

Usage: python tests/workers/gas_tokens.py
Prints "ok" when the step's update (SGD, lr 1) equals the gradient of one batch of all the
examples, mean over all their trained tokens.
"""

import deepspeed
import torch

from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig
from moespec.routing import LossConfig
from moespec.train.builders import deepspeed_config
from moespec.train.config import TrainConfig
from moespec.train.guard import StepGuard
from moespec.train.launch import init_distributed
from moespec.train.trainer import Trainer

GAS, ROWS, SEQ = 4, 2, 8


def model() -> TinyMoELM:
    torch.manual_seed(0)
    loss = LossConfig()
    loss.aux.weight = 0.0
    cfg = TinyMoEConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=SEQ)
    return TinyMoELM(cfg, MoEConfig(num_experts=4, top_k=2, ffn_size=16), loss)


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, trained in enumerate((16, 3, 9, 0)):  # the last one is masked everywhere
        ids = torch.randint(0, 40, (ROWS, SEQ), generator=g)
        labels = torch.randint(0, 40, (ROWS, SEQ), generator=g)
        labels.view(-1)[trained:] = -100
        out.append({"input_ids": ids, "labels": labels, "domain_ids": torch.zeros_like(ids)})
        assert int((labels != -100).sum()) == trained, i
    return out


def main() -> None:
    init_distributed()
    cfg = TrainConfig()
    cfg.deepspeed.gradient_accumulation_steps, cfg.deepspeed.micro_batch_size = GAS, ROWS
    cfg.deepspeed.gradient_clipping, cfg.deepspeed.zero_stage = 0.0, 0
    cfg.trainer.nonfinite = "error"
    net = model()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), config=deepspeed_config(cfg)
    )
    trainer = Trainer.__new__(Trainer)  # the step alone: no data, logger or callbacks
    trainer.cfg, trainer.engine, trainer.model, trainer.callbacks = cfg, engine, net, []
    trainer.device, trainer.world, trainer.rank, trainer.step = torch.device("cpu"), 1, 0, 1
    trainer.loss_weights, trainer.ckpt_root = {}, None
    trainer.guard = StepGuard(cfg.trainer.nonfinite, 0.0, 20, 10)
    trainer.train_step(batches())
    assert engine.is_gradient_accumulation_boundary() or engine.global_steps == 1

    ref = model()
    all_b = batches()
    ids = torch.cat([b["input_ids"] for b in all_b])
    labels = torch.cat([b["labels"] for b in all_b])
    ref(ids, labels).loss.backward()  # mean over all 28 trained tokens
    for name, p in ref.named_parameters():
        update = before[name] - dict(net.named_parameters())[name].detach()
        torch.testing.assert_close(update, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    print("ok")


if __name__ == "__main__":
    main()
