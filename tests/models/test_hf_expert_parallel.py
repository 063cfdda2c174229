"""Expert parallel for transformers MoE families beyond the original five (gpt_oss, glm4_moe).

References: the experts' own weights (the gathered export must restore the class's layout:
transposed, interleaved, biased) and the one-process model (a 2-rank launch of
``scripts/hf_coverage_ep.py`` compares logits and loss on every rank and trains 2 steps).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

pytest.importorskip("deepspeed")

from moespec.hooks import find_moe_blocks  # noqa: E402
from moespec.models.expert_parallel import convert_expert_parallel  # noqa: E402
from moespec.models.hf_tiny import tiny_moe_model  # noqa: E402
from moespec.moe import MoEConfig  # noqa: E402
from tests.common import ROOT


@pytest.mark.parametrize("family", ["gpt_oss", "glm4_moe", "qwen3_moe", "muse_spark_text"])
def test_gathered_experts_restore_the_class_layout(family: str) -> None:
    """gpt_oss: transposed, interleaved, biased; muse_spark: a post-expert norm."""
    model = tiny_moe_model(family)
    before = {
        name: {k: v.detach().clone() for k, v in block.experts.state_dict().items()}
        for name, block in find_moe_blocks(model)
    }
    convert_expert_parallel(model, MoEConfig(backend="deepspeed", ep_size=1))
    for name, block in find_moe_blocks(model):
        assert type(block.experts).__name__ == "HFExpertParallelExperts"
        got = block.experts.gather_hf_state()
        assert set(got) == set(before[name])
        for k, v in before[name].items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{name}.experts.{k}")


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_equal_one_process_and_train(torchrun2, train_env, tmp_path) -> None:
    out = tmp_path / "ep.json"
    cmd = [*torchrun2]
    cmd += [str(ROOT / "scripts/hf_coverage_ep.py"), str(out), "gpt_oss:gpt_oss,glm4_moe:glm4_moe"]
    proc = subprocess.run(cmd, env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results == {
        "gpt_oss": {"ok": True, "reason": ""},
        "glm4_moe": {"ok": True, "reason": ""},
    }, results
