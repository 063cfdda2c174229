"""A newcomer's first hour, as commands in a fresh directory: chat SFT on a tiny Hugging Face
MoE with no tokenizer of their own, the export used in plain transformers, evaluation and the
report on it, LoRA with expert parallelism, file modes, quiet logs and sweep run names.

Each test runs the console commands the README and docs/quickstart.md give, as subprocesses.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MODEL = ["model=hf", "model.config=model/configs/qwen3_moe_tiny.json"]
SMALL = [
    "data.source=data/chat/train.jsonl",
    "data.val_fraction=0.25",
    "deepspeed.micro_batch_size=4",
    "trainer.max_steps=4",
    "trainer.eval_every=4",
    "trainer.save_every=4",
]


def command(cwd: Path, env: dict[str, str], *args: str, timeout: int = 600):
    """``args`` run in ``cwd`` (console scripts from this environment) under umask 022."""
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    return subprocess.run(
        [exe, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip


def one_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory, train_env) -> Path:
    """A fresh directory holding the synthetic task as chat JSON Lines."""
    d = tmp_path_factory.mktemp("newcomer")
    out = command(d, train_env, sys.executable, "-m", "moespec.data.synth", "--out", "data",
                  "--train", "160", "--val", "24", "--format", "chat")  # fmt: skip
    assert out.returncode == 0, out.stderr
    return d


@pytest.fixture(scope="module")
def chat_run(home, train_env):
    """``moespec-train experiment=sft model=hf model.config=... data.format=chat``: 4 steps."""
    args = ["experiment=sft", *MODEL, *SMALL, "data.format=chat", "hydra.run.dir=run"]
    proc = command(home, train_env, "moespec-train", *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return home / "run", proc


def test_chat_sft_on_a_tiny_hf_model_trains_its_own_chat_tokenizer(home, train_env, chat_run):
    run, proc = chat_run
    log = (run / "train.log").read_text()
    assert "random-init model: vocab_size=" in log
    assert "step 4/4" in log
    auto = ["experiment=sft", *MODEL, *SMALL, "data.format=auto"]
    check = command(home, train_env, "moespec-train", "--check", *auto)
    assert check.returncode == 0 and check.stdout.startswith("ok"), check.stderr[-3000:]
    # quiet: no accelerator guess nor compiler probe lines
    assert "Setting accelerator to CPU" not in proc.stderr + proc.stdout
    assert "gcc " not in proc.stderr + proc.stdout
    assert "\r" not in proc.stderr + (run / "train.log").read_text()


def test_export_works_in_plain_transformers(chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = chat_run
    model_dir = run / "hf_model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == end == model.config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert json.loads((model_dir / "moespec_export.json").read_text()) == {"step": 4}


def test_written_files_are_readable_by_the_group(chat_run):
    """Under umask 022 checkpoints, the export and the logs are 0644 (directories 0755)."""
    run, _ = chat_run
    files = [p for p in run.rglob("*") if not p.is_symlink() and "wandb" not in p.parts]
    assert any(p.name == "model.safetensors" for p in files)
    assert any(p.name.startswith("rank0_state") for p in files)
    private = [str(p.relative_to(run)) for p in files if not p.stat().st_mode & stat.S_IROTH]
    assert not private


def test_eval_on_the_export_writes_beside_it(home, train_env, chat_run):
    run, _ = chat_run
    proc = command(home, train_env, "moespec-eval", "run/hf_model",
                   "+eval.sets.val.source=data/chat/val.jsonl")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = home / "run" / "hf_model_eval" / "results_step000004.json"
    assert f"results of step 4: {Path('run/hf_model_eval/results_step000004.json')}" in (
        proc.stdout
    )
    assert "eval/val/loss" in json.loads(results.read_text())
    assert not (run / "hf_model" / "eval").exists()


def test_generate_without_a_fitting_extractor_names_one(home, train_env, chat_run):
    rows = [
        {"messages": [{"role": "user", "content": f"{i} plus 1?"},
                      {"role": "assistant", "content": f"It is {i + 1}."}]}
        for i in range(3)
    ]  # fmt: skip
    (home / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = command(home, train_env, "moespec-eval", "run/hf_model",
                   "+eval.sets.qa.source=plain.jsonl", "+eval.sets.qa.metrics=[generate]")  # fmt: skip
    err = one_error(proc)
    assert "eval.sets.qa: extract=gsm8k finds no answer in the reference of example 1" in err
    assert "eval.sets.qa.extract=last_number reads an answer from every reference" in err


def test_report_reads_chat_rows_on_the_export(home, train_env, chat_run):
    proc = command(home, train_env, "moespec-report", "run/hf_model", "--data",
                   "data/chat/val.jsonl", "--out", "report", "--snippets", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr  # no progress-bar frames when the output is not a terminal
    report = json.loads((home / "report" / "report.json").read_text())
    assert report["models"][0]["step"] == 4
    assert report["data"]["domains"] == ["arithmetic", "choice", "string", "units"]


def test_lora_with_expert_parallel(home, train_env, torchrun2):
    ep = [*MODEL, *SMALL, "model.lora.enabled=true", "moe=deepspeed", "moe.ep_size=2"]
    err = one_error(command(home, train_env, "moespec-train", "--check", "experiment=sft", *ep))
    assert "model.lora.enabled=true with moe.backend=deepspeed needs deepspeed=zero0" in err
    launch = [*torchrun2, "-m", "moespec.train", "experiment=sft", *ep, "deepspeed=zero0"]
    proc = command(home, train_env, *launch, "hydra.run.dir=lora_ep")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (home / "lora_ep" / "hf_model" / "model.safetensors").is_file()


def test_sweep_runs_are_named_by_their_overrides(home, train_env):
    args = ["-m", "experiment=smoke", "trainer.max_steps=1", "trainer.eval_every=1",
            "loss=aux_only,specialization", "hydra.sweep.dir=sweep"]  # fmt: skip
    proc = command(home, train_env, "moespec-train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, loss in enumerate(["aux_only", "specialization"]):
        log = (home / "sweep" / str(num) / "train.log").read_text()
        assert f"wandb run {num}:experiment=smoke," in log and f"loss={loss}" in log


def test_no_library_progress_bars_when_stderr_is_not_a_terminal(train_env):
    """datasets, transformers (its "Writing model shards" bar) and plain tqdm (the GGUF
    loader's "de-quantizing" bar) stay quiet."""
    code = (
        "from moespec.cli import prepare_environment\n"
        "prepare_environment()\n"
        "import datasets\n"
        "from tqdm.auto import tqdm\n"
        "from transformers.utils import logging\n"
        "print(logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())\n"
        "print(tqdm(range(2)).disable)\n"
    )
    env = {k: v for k, v in train_env.items() if "PROGRESS_BARS" not in k and k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False", "True"]
