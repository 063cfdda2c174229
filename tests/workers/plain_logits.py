"""Worker: logits of exported model directories in plain transformers (fails if moespec
gets imported).

Usage: python tests/workers/plain_logits.py IDS.pt MODEL_DIR OUT.pt [MODEL_DIR OUT.pt ...]
"""

import sys

import torch
from transformers import AutoModelForCausalLM

ids = torch.load(sys.argv[1])
for model_dir, out in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids, use_cache=False).logits, out)
assert not any(m.startswith("moespec") for m in sys.modules), "moespec was imported"
