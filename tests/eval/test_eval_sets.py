"""Evaluation sets: batched accuracy equals a one-example-at-a-time loop; bad sets are refused."""

from __future__ import annotations

import json

import pytest
import torch

from moespec.data.pipeline import DataConfig
from moespec.data.synth import ANSWER_EXTRACTION, generate
from moespec.data.tokenizer import train_bpe_tokenizer
from moespec.eval.extract import exact_match
from moespec.eval.sets import EvalSetConfig, eval_set_config, evaluate_set, load_eval_set
from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A few shipped-task examples, a tokenizer trained on them, an untrained tiny model."""
    rows = generate(12, seed=4)
    path = tmp_path_factory.mktemp("eval") / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer((r["prompt"] + r["completion"] for r in rows * 3), 400)
    torch.manual_seed(0)
    cfg = TinyMoEConfig(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, max_seq_len=256
    )
    model = TinyMoELM(cfg, MoEConfig(num_experts=4, top_k=2, ffn_size=32))
    return path, rows, tok, model


def _set_config(path) -> EvalSetConfig:
    per_domain = {d: {"extract": m, **kw} for d, (m, kw) in ANSWER_EXTRACTION.items()}
    return eval_set_config(
        {"source": str(path), "metrics": ["loss", "generate"], "max_new_tokens": 6,
         "batch_size": 5, "per_domain": per_domain},
        "eval.sets.t",
    )  # fmt: skip


def test_batched_accuracy_equals_one_example_at_a_time(task, tmp_path):
    path, rows, tok, model = task
    es = load_eval_set("t", _set_config(path), DataConfig(format="prompt_completion"), tok)
    assert len(es.prompts) == len(rows)
    got = evaluate_set(model, es, tok, torch.device("cpu"), tmp_path, step=3)
    written = [
        json.loads(x) for x in (tmp_path / "t" / "step000003.jsonl").read_text().splitlines()
    ]
    hits = []
    model.eval()
    for row, rec in zip(rows, written):  # the reference: one prompt, no padding, plain loop
        seq = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(t)
                new.append(t)
                if t == tok.eos_token_id:
                    break
        text = tok.decode(new, skip_special_tokens=True)
        method, kw = ANSWER_EXTRACTION[row["domain"]]
        assert rec["prediction"] == text and rec["reference"].strip() == row["completion"].strip()
        hits.append(exact_match(text, row["completion"], method, **kw))
        assert rec["correct"] == hits[-1]
    assert got["eval/t/accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert {"eval/t/loss", "eval/t/ppl", "eval/t/routing/maxvio", "eval/t/accuracy/units"} <= set(
        got
    )


def test_teacher_forced_loss_is_the_mean_over_completion_tokens(task):
    path, rows, tok, model = task
    es = load_eval_set("t", _set_config(path), DataConfig(format="prompt_completion"), tok)
    got = evaluate_set(model, es, tok, torch.device("cpu"), None, step=0)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, trained in es.examples:  # each example alone
            x = torch.tensor([ids[:-1]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(ids[1:], trained[1:])]])
            out = model(x, labels)
            total += float(out.token_losses[labels != -100].sum())
            count += int((labels != -100).sum())
    assert got["eval/t/loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    "node,needle",
    [
        ({"source": ""}, "source is empty"),
        ({"source": "/no/such.jsonl"}, "no such file"),
        ({"source": __file__, "extract": "regex", "pattern": "####"}, "capture group"),
        ({"source": __file__, "metrics": ["bleu"]}, "valid: loss, generate"),
        ({"source": __file__, "topk": 1}, "unknown key 'topk'"),
        ({"source": __file__, "per_domain": {"x": {"extract": "median"}}}, "valid: regex"),
    ],
)
def test_bad_sets_are_refused(node, needle):
    with pytest.raises(ValueError, match=needle):
        eval_set_config(node, "eval.sets.t")


@pytest.mark.multiproc
def test_moespec_eval_on_a_run_dir_reproduces_the_training_evaluation(
    run_train, train_env, tmp_path
):
    """Train a few SFT steps with an eval set; moespec-eval on the run directory (recipe and
    latest checkpoint) gives the figures the run logged at its last step."""
    import subprocess
    import sys

    from moespec.data.synth import write_task

    task = write_task(tmp_path / "task", train=300, val=20, seed=2, domains=["arithmetic", "units"])
    run_dir = tmp_path / "run"
    sets = [
        f"+eval.sets.v.source={task['prompt_completion/val']}", "+eval.sets.v.metrics=[loss,generate]",
        "+eval.sets.v.max_new_tokens=8", "+eval.sets.v.extract=gsm8k",
    ]  # fmt: skip
    proc = run_train([
        "experiment=sft", f"data.source={task['prompt_completion/train']}", "data.seq_len=128",
        "data.val_fraction=0.2", "deepspeed.micro_batch_size=4",
        "trainer.max_steps=6", "trainer.log_every=3", "trainer.eval_every=6", "trainer.save_every=6",
        "trainer.progress=false", *sets, f"hydra.run.dir={run_dir}",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    again = subprocess.run(
        [sys.executable, "-m", "moespec.train.eval_cli", str(run_dir)],
        capture_output=True, text=True, env=train_env, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    got = json.loads((run_dir / "eval" / "results_step000006.json").read_text())
    assert got and set(got) <= set(logged)
    for key, value in got.items():
        assert value == pytest.approx(logged[key], rel=1e-5), key
    assert (run_dir / "eval" / "v" / "step000006.jsonl").is_file()


def test_moespec_eval_refuses_what_it_cannot_evaluate(tmp_path):
    from moespec.train.runs import recipe_of

    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        recipe_of(tmp_path, [])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        recipe_of(tmp_path, [])
