"""Training transformers MoE models through the CLI: losses, LoRA, expert parallel, export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.common import ROOT

WORKERS = ROOT / "tests" / "workers"

FAST = [
    "loss=specialization",
    "trainer.max_steps=3",
    "trainer.log_every=3",
    "trainer.eval_every=3",
    "trainer.plot_every=100",
    "trainer.progress=false",
    "wandb.enabled=false",
]
VOCAB = 1024


def _ids(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ids.pt"
    torch.save(ids, path)
    return ids, path


def plain_logits(model_dirs: list[Path], tmp_path: Path) -> list[torch.Tensor]:
    """Logits of each exported dir, loaded by plain transformers in a subprocess."""
    _, ids_path = _ids(tmp_path)
    outs = [tmp_path / f"plain{i}.pt" for i in range(len(model_dirs))]
    args = [a for d, o in zip(model_dirs, outs, strict=True) for a in (str(d), str(o))]
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "plain_logits.py"), str(ids_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(o) for o in outs]


def run_config(run_dir: Path):
    """The run's resolved TrainConfig (from .hydra/config.yaml)."""
    from moespec.train.config import TrainConfig

    raw = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    raw.pop("run_name", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))


def trained_logits(run_dir: Path, tmp_path: Path) -> torch.Tensor:
    """The trained model as moespec holds it: rebuilt wrapper + the last engine checkpoint."""
    from moespec.models.hf_train import build_hf_model

    cfg = run_config(run_dir)
    wrapper = build_hf_model(cfg)
    ckpt = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    wrapper.load_state_dict(state, strict=True)
    wrapper.handle.detach()
    wrapper.eval()
    ids, _ = _ids(tmp_path)
    with torch.no_grad():
        return wrapper(ids).logits


def _train(run_train, run_dir: Path, args: list[str], **kw):
    proc = run_train([*args, *FAST, f"hydra.run.dir={run_dir}"], **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "hf_model" / "config.json").is_file()
    return proc


ARCHS = [
    "qwen3_moe",
    "mixtral",
    pytest.param("olmoe", marks=pytest.mark.slow),
    pytest.param("deepseek_v3", marks=pytest.mark.slow),
    pytest.param("qwen2_moe", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_and_exports(run_train, read_metrics, tmp_path, arch):
    run_dir = tmp_path / arch
    _train(run_train, run_dir, [f"experiment={arch}_tiny"])
    rows = [r for r in read_metrics(run_dir) if "train/lm_loss" in r]
    assert rows and all(r["loss/orthogonality"] > 0 and r["loss/variance"] > 0 for r in rows)
    assert "routing/maxvio" in rows[-1] and "val/loss" in rows[-1]
    config = json.loads((run_dir / "hf_model" / "config.json").read_text())
    assert config["model_type"] == arch
    (plain,) = plain_logits([run_dir / "hf_model"], tmp_path)
    ref = trained_logits(run_dir, tmp_path)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)


def test_lora_trains_router_and_exports_merged(run_train, tmp_path):
    from moespec.models.hf_train import build_hf_model
    from moespec.train.config import TrainConfig

    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(TrainConfig),
            {
                "model": {
                    "type": "hf",
                    "config": "model/configs/qwen3_moe_tiny.json",
                    "lora": {"enabled": True},
                }
            },
        )
    )
    wrapper = build_hf_model(cfg)
    trainable = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.endswith("mlp.gate.weight") for n in trainable), (
        trainable
    )
    assert sum(n.endswith("mlp.gate.weight") for n in trainable) == 2
    cfg.model.lora.train_router = False
    wrapper = build_hf_model(cfg)
    assert all("lora_" in n for n, p in wrapper.named_parameters() if p.requires_grad)

    run_dir = tmp_path / "lora"
    _train(
        run_train,
        run_dir,
        ["experiment=qwen3_moe_tiny", "model.lora.enabled=true", "optim.lr=1e-2"],
    )
    from safetensors.torch import load_file

    exported = load_file(run_dir / "hf_model" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in exported)
    (plain,) = plain_logits([run_dir / "hf_model"], tmp_path)
    ref = trained_logits(run_dir, tmp_path)  # adapters unmerged: a real check of the merge
    torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-4)
    init = build_hf_model(run_config(run_dir)).hf_model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[q], init[q.replace("q_proj.", "q_proj.base_layer.")])


@pytest.mark.parametrize(
    "arch", ["qwen3_moe", "deepseek_v3", pytest.param("mixtral", marks=pytest.mark.slow)]
)
def test_expert_parallel_block_matches_hf_block(train_env, arch):
    _run_check("ep_block_check.py", arch, train_env)


def _run_check(worker: str, arch: str, env: dict[str, str]) -> None:
    """Run a worker of tests/workers in a fresh interpreter (DeepSpeed MoE needs a process
    group)."""
    proc = subprocess.run(
        [sys.executable, str(WORKERS / worker), arch],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and f"ok {arch}" in proc.stdout, proc.stderr[-4000:]


def test_resume_keeps_calibrated_weights(run_train, read_metrics, tmp_path):
    """HF routers live outside the model state: β/γ come back from the trainer state."""
    run_dir = tmp_path / "resume"
    args = [*FAST, "experiment=qwen3_moe_tiny", "trainer.max_steps=8", "trainer.log_every=1"]
    args.append(f"hydra.run.dir={run_dir}")
    proc = run_train([*args, "trainer.stop_after=4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "calibrated loss weights" in proc.stdout + proc.stderr
    proc = run_train([*args, "trainer.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "calibrated loss weights" not in proc.stdout + proc.stderr
    rows = [r for r in read_metrics(run_dir) if "weights/orthogonality" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("weights/orthogonality", "weights/variance"):
        values = {r[key] for r in rows}
        assert len(values) == 1 and math.isfinite(values.pop()), key


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "olmoe"])
def test_expert_parallel_block_top1_matches_hf_block(train_env, arch):
    """With one expert per token the expert-parallel experts give the block's output."""
    _run_check("ep_top1_check.py", arch, train_env)


def test_hf_gates_get_no_weight_decay(tmp_path):
    from moespec.models.hf_train import build_hf_model
    from moespec.train.builders import optimizer_groups
    from moespec.train.config import TrainConfig

    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {"model": {"type": "hf", "config": "model/configs/qwen3_moe_tiny.json"}},
    )
    model = build_hf_model(OmegaConf.to_object(cfg))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {
        names[id(p)] for g in optimizer_groups(model, 0.1) if g["weight_decay"] for p in g["params"]
    }
    gates = [n for n in names.values() if n.endswith("mlp.gate.weight")]
    assert len(gates) == 2 and not set(gates) & decay
    assert any(n.endswith("experts.gate_up_proj") for n in decay)  # experts still decay


EP_ARCHS = [
    "qwen3_moe",
    "deepseek_v3",
    pytest.param("qwen2_moe", marks=pytest.mark.slow),
    pytest.param("olmoe", marks=pytest.mark.slow),
    pytest.param("mixtral", marks=pytest.mark.slow),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("arch", EP_ARCHS)
def test_expert_parallel_two_ranks_exports_plain(run_train, tmp_path, arch):
    """3 steps with EP=2 over 2 ranks; the export holds each rank's trained experts, and
    DeepSpeed's CPU allreduce buffers are gone from /dev/shm."""
    from transformers import AutoModelForCausalLM

    from moespec.hooks import find_moe_blocks
    from moespec.train.launch import deepspeed_launcher, free_port

    port = free_port()
    launcher = deepspeed_launcher(2, port=port)
    run_dir = tmp_path / "ep"
    proc = _train(
        run_train,
        run_dir,
        [f"experiment={arch}_tiny", "moe=deepspeed", "moe.ep_size=2", "loss=specialization"],
        launcher=launcher,
    )
    assert f"expert parallel: 2 {arch} MoE blocks" in proc.stderr + proc.stdout
    buffers = Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    assert not list(buffers)
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    state = plain.state_dict()
    ckpt = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    blocks = [name for name, _ in find_moe_blocks(plain)]
    assert len(blocks) == 2
    for layer, name in enumerate(blocks):
        torch.testing.assert_close(
            state[f"{name}.gate.weight"], module[f"model.{name}.gate.weight"]
        )
        for e in range(4):  # experts 0-1 trained on rank 0, 2-3 on rank 1
            sd = torch.load(
                ckpt / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt", weights_only=False
            )
            key = f"model.{name}.experts.deepspeed_moe.experts.deepspeed_experts.{e}."
            torch.testing.assert_close(
                state[f"{name}.experts.gate_up_proj"][e], sd[key + "proj.weight"]
            )
            torch.testing.assert_close(
                state[f"{name}.experts.down_proj"][e], sd[key + "down.weight"]
            )
    q = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(state[q], module["model." + q])
    (logits,) = plain_logits([run_dir / "hf_model"], tmp_path)
    assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()


def test_errors_are_one_line(train_env, tmp_path):
    cases = {
        "dense": (["model.config=model/configs/llama_tiny.json"], "no MoE blocks found"),
        "missing": (
            ["model.config=null", f"model.name_or_path={tmp_path / 'nope'}"],
            "is not a directory; expected a save_pretrained directory",
        ),
    }
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moespec.train",
                "experiment=qwen3_moe_tiny",
                *args,
                *FAST,
                f"hydra.run.dir={tmp_path / name}",
            ],
            env=train_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-3000:])
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, err[-3000:])


def test_random_init_vocab_follows_the_tokenizer():
    """A model from a config embeds the data tokenizer's vocabulary; a vocabulary fixed by
    model.overrides (or a pretrained model's) smaller than the tokenizer is an error."""
    from moespec.models.hf_train import build_hf_model
    from moespec.train.config import TrainConfig

    def cfg(**model):
        base = {"type": "hf", "config": "model/configs/mixtral_tiny.json", **model}
        return OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TrainConfig), {"model": base})
        )

    built = build_hf_model(cfg(), vocab_size=1500)
    assert built.hf_model.get_input_embeddings().weight.shape[0] == 1500
    assert built.hf_model.config.vocab_size == 1500
    with pytest.raises(
        ValueError, match="tokenizer has 4096 tokens but MixtralForCausalLM embeds 1024"
    ):
        build_hf_model(cfg(overrides={"vocab_size": 1024}), vocab_size=4096)


def test_lm_loss_excludes_the_models_own_aux_loss():
    """With moespec's α = 0 the model's own aux loss trains, but lm_loss stays pure CE."""
    import torch.nn.functional as F
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from moespec.models.hf_train import build_hf_model
    from moespec.models.tiny import lm_output
    from moespec.train.config import TrainConfig

    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {
            "model": {"type": "hf", "config": "model/configs/qwen3_moe_tiny.json"},
            "loss": {"aux": {"weight": 0.0}},
        },
    )
    model = build_hf_model(OmegaConf.to_object(cfg))
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, ids)
    config = model.hf_model.config
    assert config.output_router_logits and config.router_aux_loss_coef > 0
    # References computed here: CE of the logits against the aligned labels, and the model's
    # own Switch loss from its router logits (a second, plain transformers forward).
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), ids.reshape(-1))
    plain = model.hf_model(input_ids=ids, use_cache=False)
    torch.testing.assert_close(plain.logits, out.logits)
    aux = load_balancing_loss_func(
        plain.router_logits, config.num_experts, config.num_experts_per_tok
    )
    assert aux.item() > 0
    model_aux = config.router_aux_loss_coef * aux
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.model_aux_loss, model_aux)
    torch.testing.assert_close(out.loss, ce + model_aux)
    torch.testing.assert_close(lm_output(out.logits, ids).loss, ce)


def test_resume_logs_changed_weights_and_a_fresh_auto_start(run_train, tmp_path):
    """HF routers keep no module state: a weight changed on resume is still reported, and
    trainer.resume=auto in a directory without checkpoints says it starts at step 0."""
    run_dir = tmp_path / "resume"
    args = [*FAST, "experiment=qwen3_moe_tiny", "trainer.max_steps=4", f"hydra.run.dir={run_dir}"]
    first = run_train([*args, "trainer.stop_after=2", "trainer.resume=auto"])
    assert first.returncode == 0, first.stderr[-4000:]
    assert "trainer.resume=auto: no checkpoint in" in first.stderr + first.stdout
    resumed = run_train([*args, "trainer.resume=auto", "loss.aux.weight=0.02"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "loss weight aux: 0.01 in the checkpoint, 0.02 now" in resumed.stderr + resumed.stdout
