"""The GPU check and its wheelhouse, on the CPU: parts, budgets, skip paths, the report, the
FLOP count of the MFU against the model's own parameters, and the wheel list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.common import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _script("gpu_check")
gpu_wheels = _script("gpu_wheels")


def test_the_parts_fit_one_device_call_with_room_for_a_rerun():
    parts = gpu_check.parts()
    assert [p.name for p in parts] == ["peak", "tests", "moe_layer", "hf", "sft_aux", "sft_spec"]
    assert sum(p.budget_s for p in parts) <= 480 - 30  # the timeout_s, start-up aside


def test_skip_reasons_name_what_is_missing():
    part = gpu_check.Part("x", 1, needs=("moespec", "no_such_module_xyz"))
    assert gpu_check.skip_reason(part, has_gpu=False) == "skipped: no CUDA GPU"
    reason = gpu_check.skip_reason(part, has_gpu=True)
    assert reason.startswith("skipped: no_such_module_xyz not installed") and "gpu_wheels" in reason
    assert gpu_check.skip_reason(gpu_check.Part("y", 1, needs=("torch",)), has_gpu=True) is None


def test_without_a_gpu_every_part_is_skipped_and_reported(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in result["parts"].items()} == {
        p.name: "skipped: no CUDA GPU" for p in gpu_check.parts()
    }
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check\n\nDevice: no CUDA GPU") and "## sft_spec (" in report


def test_an_unknown_part_is_refused():
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--only", "peak,nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown parts ['nope']; valid: peak, tests" in proc.stderr


def test_flops_per_token_counts_the_active_parameters_of_the_model():
    """Reference: the parameters of the model itself (meta device), each expert tensor scaled
    by k/E, norms aside, input embedding excluded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(gpu_check.MID_MODEL)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    k_over_e = config.num_experts_per_tok / config.num_experts
    active = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue
        active += p.numel() * (k_over_e if ".experts." in name else 1.0)
    seq = 1024
    heads, d = config.num_attention_heads, config.head_dim
    want = 6 * active + 6 * config.num_hidden_layers * seq * heads * d
    assert gpu_check.flops_per_token(gpu_check.MID_MODEL, seq) == pytest.approx(want, rel=1e-9)
    total = sum(p.numel() for p in model.parameters())
    assert 1.0e9 < total < 3.0e9  # the mid-size: about 1-3B parameters


def test_table_lines_keep_tables_summaries_and_pytest_counts():
    out = "noise\n| a | b |\n|---|---|\nMoELayer reaches 0.9\n3 passed, 2 skipped in 1.0s\nlog"
    assert gpu_check.table_lines(out) == [
        "| a | b |",
        "|---|---|",
        "MoELayer reaches 0.9",
        "3 passed, 2 skipped in 1.0s",
    ]


def test_the_wheel_list_is_what_the_image_lacks_at_the_versions_installed_here():
    from importlib import metadata

    carried = gpu_wheels.carried()
    for name in ("deepspeed", "hydra-core", "omegaconf", "datasets", "wandb", "transformers"):
        assert carried[name] == metadata.version(name)
    assert not {"torch", "numpy", "triton", "safetensors", "moespec"} & set(carried)
    assert "wandb" not in gpu_wheels.carried(skip=("wandb",))
    download, build, own = gpu_wheels.commands(carried, ROOT / ".whl")
    assert "--only-binary=:all:" in download and "manylinux_2_17_x86_64" in download
    assert "3.12" in download and f"deepspeed=={carried['deepspeed']}" in build
    assert not any(a.startswith("deepspeed==") for a in download) and own[-1] == str(ROOT)


@pytest.mark.slow
def test_smoke_runs_the_sft_part_on_the_cpu(tmp_path):
    """The SFT command the GPU will run, at toy sizes: the recipe keys and the figures work."""
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--smoke", "--only", "sft_spec",
         "--budget-scale", "8", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    part = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["sft_spec"]
    assert part["status"] == "ok", part
    assert "tokens/s, MFU" in part["lines"][0]
