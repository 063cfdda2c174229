"""Worker: an HF model converted to expert parallel (one rank) gives the logits and the plain
state dict of the unconverted one.

Usage: python tests/workers/ep_block_check.py ARCH (run from the repository root)
"""

import sys

import torch
from omegaconf import OmegaConf

from moespec.models.hf_train import build_hf_model
from moespec.train.config import TrainConfig
from moespec.train.launch import init_distributed

init_distributed()
base = {"model": {"type": "hf", "config": "model/configs/" + sys.argv[1] + "_tiny.json"}}
ep = OmegaConf.merge(base, {"moe": {"backend": "deepspeed", "ep_size": 1}})
models = []
for recipe in (base, ep):  # the same seed: the same model before conversion
    torch.manual_seed(0)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), recipe))
    model = build_hf_model(cfg)
    for name, buf in model.named_buffers():  # DeepSeek-V3: selection uses the bias
        if name.endswith("e_score_correction_bias"):
            g = torch.Generator().manual_seed(3)
            buf.copy_(0.3 * torch.randn(buf.shape, generator=g))
    models.append(model.eval())
ref, conv = models
kinds = {type(p.block.experts).__name__ for p in conv.handle.probes}
assert kinds == {"HFExpertParallelExperts"}, kinds
ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.testing.assert_close(conv(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    state = conv.plain_state_dict()
plain = ref.hf_model.state_dict()
assert set(state) == set(plain), set(state) ^ set(plain)
for k, v in plain.items():
    torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
print("ok", sys.argv[1])
