"""Worker: with one expert per token the expert-parallel experts give the block's output.

Usage: python tests/workers/ep_top1_check.py ARCH (run from the repository root)
"""

import copy
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moespec.models.expert_parallel import convert_expert_parallel
from moespec.moe import MoEConfig
from moespec.train.launch import init_distributed

init_distributed()
arch = sys.argv[1]
cfg = AutoConfig.from_pretrained("recipes/model/configs/" + arch + "_tiny.json")
cfg.num_experts_per_tok = 1
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).eval()
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.2)
conv = copy.deepcopy(model)
convert_expert_parallel(conv, MoEConfig(backend="deepspeed"))
x = torch.randint(0, cfg.vocab_size, (2, 6))
with torch.no_grad():
    torch.testing.assert_close(conv(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
print("ok", arch)
