"""DeepSpeed AutoEP (``moe.backend=autoep``): the families it runs exactly, the refusals, and
the one compatibility shim with the installed transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from moespec.models.autoep import VERIFIED, autoep_section, check_family  # noqa: E402
from tests.common import ROOT  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "autoep_check.py"


def test_the_registry_shim_is_still_needed():
    """Fails the day transformers' ``_CanRecordRegistry.get`` takes AutoEP's ``(key, default)``
    again (or DeepSpeed stops calling it so): then ``install_compat`` can go."""
    code = "from moespec.models.autoep import registry_shim_needed; print(registry_shim_needed())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_the_shim_keeps_transformers_lookup_by_model():
    from transformers.utils import output_capturing as oc

    from moespec.models.autoep import install_compat, registry_shim_needed
    from moespec.models.hf_tiny import tiny_moe_model

    install_compat()
    assert not registry_shim_needed()
    registry = oc._CanRecordRegistry()  # a fresh one: the global stays as it is
    model = tiny_moe_model("qwen3_moe")
    key = str(type(model))
    registry[model] = {"router_logits": "recorded"}  # transformers' own way in: by model
    assert registry.get(model) == {"router_logits": "recorded"}
    assert registry.get(key) == {"router_logits": "recorded"}  # AutoEP's way: by class name
    assert registry.get("<class 'not.a.Model'>", "default") == "default"
    assert registry.get("<class 'not.a.Model'>") is None


@pytest.mark.parametrize(
    "model_type,needle",
    [
        ("gpt_oss", "'gpt_oss': DeepSpeed AutoEP has no preset for it"),
        ("deepseek_v2", "'deepseek_v2': its logits differ from the model's"),
    ],
)
def test_families_autoep_does_not_run_exactly_are_refused(model_type, needle):
    with pytest.raises(ValueError, match=needle) as err:
        check_family(model_type)
    assert "use moe.backend=deepspeed" in str(err.value)


def test_the_section_moespec_writes():
    assert autoep_section("mixtral", 2) == {
        "enabled": True,
        "autoep_size": 2,
        "preset_model": "mixtral",
        "score_apply": "post",
        "combine_impl": "weighted_sum",
    }


@pytest.mark.multiproc
def test_two_ranks_equal_the_unconverted_model(torchrun2, train_env, tmp_path):
    """Logits, every routing loss per layer, router and embedding gradients, and the weights
    under the block's own names, for every family claimed (``VERIFIED``), at EP=2."""
    out = tmp_path / "autoep.json"
    families = ["deepseek_v3", "minimax_m3_vl", "mixtral", "qwen2_moe", "qwen3_5_moe", "qwen3_moe"]
    cmd = [*torchrun2, str(WORKER), str(out), ",".join(families)]
    proc = subprocess.run(cmd, env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert {f: r["ok"] for f, r in results.items()} == {f: True for f in families}, results
    assert {r["model_type"] for r in results.values()} == set(VERIFIED)


@pytest.mark.multiproc
def test_training_through_autoep_equals_moespec_dispatch(run_train, read_metrics, tmp_path):
    """4 steps of qwen3_moe at EP=2 with the specialization losses: AutoEP and moespec's own
    dispatch log the same losses and routing metrics and export the same weights."""
    from transformers import AutoModelForCausalLM

    from moespec.train.launch import deepspeed_launcher, free_port

    runs = {}
    for backend in ("autoep", "deepspeed"):
        run_dir = tmp_path / backend
        args = ["experiment=qwen3_moe_tiny", f"moe={backend}", "moe.ep_size=2"]
        args += ["loss=specialization", "trainer.max_steps=4", "trainer.log_every=2"]
        args += ["trainer.progress=false", "trainer.plot_every=100", "wandb.enabled=false"]
        launcher = deepspeed_launcher(2, port=free_port())
        proc = run_train([*args, f"hydra.run.dir={run_dir}"], launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[backend] = run_dir
    got, want = (read_metrics(runs[b]) for b in ("autoep", "deepspeed"))
    keys = ["train/loss", "loss/orthogonality", "loss/variance", "routing/maxvio"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g["step"], key)
    exported = {b: AutoModelForCausalLM.from_pretrained(d / "hf_model") for b, d in runs.items()}
    state, reference = (exported[b].state_dict() for b in ("autoep", "deepspeed"))
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.multiproc
def test_an_autoep_run_resumes_at_another_ep_size(run_train, read_metrics, tmp_path):
    """Saved at EP=2 on 2 ranks, resumed at EP=1 on the same 2 ranks through DeepSpeed's
    universal checkpoint: the next steps' losses equal the uninterrupted run's."""
    import shutil

    from moespec.train.launch import deepspeed_launcher, free_port

    base = ["experiment=qwen3_moe_tiny", "moe=autoep", "loss=specialization"]
    base += ["trainer.max_steps=4", "trainer.log_every=1", "trainer.progress=false"]
    base += ["trainer.plot_every=100", "trainer.eval_every=100", "wandb.enabled=false"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = [*base, "moe.ep_size=2", "trainer.save_every=2", f"hydra.run.dir={whole}"]
    proc = run_train(args, launcher=deepspeed_launcher(2, port=free_port()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copytree(
        whole / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002"
    )
    args = [*base, "moe.ep_size=1", "trainer.resume=auto", f"hydra.run.dir={resumed}"]
    proc = run_train(args, launcher=deepspeed_launcher(2, port=free_port()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (resumed / "universal" / "step00000002" / "COMPLETE").is_file()
    want = {r["step"]: r for r in read_metrics(whole) if "train/loss" in r}
    got = {r["step"]: r for r in read_metrics(resumed) if "train/loss" in r}
    assert sorted(got) == [3, 4]
    for step in got:
        for key in ("train/loss", "loss/orthogonality", "routing/maxvio"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), key


def test_the_models_own_expert_count_is_checked_against_ep_size():
    """An HF model brings its experts: the recipe's moe.num_experts is not what must divide."""
    from types import SimpleNamespace

    from moespec.models.hf_tiny import tiny_moe_model
    from moespec.models.hf_train import _autoep_ready
    from moespec.moe import MoEConfig

    MoEConfig(backend="autoep", num_experts=8, ep_size=3).validate(own_experts=False)
    with pytest.raises(ValueError, match="moe.num_experts=8 is not divisible by moe.ep_size=3"):
        MoEConfig(backend="autoep", num_experts=8, ep_size=3).validate()
    cfg = SimpleNamespace(moe=SimpleNamespace(ep_size=3), model=SimpleNamespace(
        lora=SimpleNamespace(enabled=False)))  # fmt: skip
    with pytest.raises(ValueError, match=r"mlp.experts: 4 experts are not divisible by moe.ep_si"):
        _autoep_ready(tiny_moe_model("qwen3_moe"), cfg)
