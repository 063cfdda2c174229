"""moespec-report on a trained smoke run: every number of report.json against a plain loop
over the tokens of a small labelled data set (routing read from the routers' own outputs,
expert outputs recomputed expert by expert)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from moespec.report.browser import chromium, image_status, screenshot
from moespec.report.browser import main as browser_main
from moespec.report.cli import main

DOMAINS = {
    "bible": "And the LORD spake unto Moses, saying, Speak unto the children of Israel. ",
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n",
    "prose": "The committee met on Tuesday to discuss the budget for the coming year. ",
}


@pytest.fixture(scope="module")
def smoke_run(run_train, tmp_path_factory) -> Path:
    """A 4-step smoke run with a checkpoint."""
    run_dir = tmp_path_factory.mktemp("report_run") / "run"
    proc = run_train(
        [
            "experiment=smoke",
            "trainer.max_steps=4",
            "trainer.progress=false",
            "wandb.enabled=false",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Twelve documents of three domains, one unlabelled."""
    path = tmp_path_factory.mktemp("report_data") / "eval.jsonl"
    rows = [{"text": text * (2 + i), "domain": d} for i in range(4) for d, text in DOMAINS.items()]
    rows.append({"text": "no label here at all, " * 5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def report(smoke_run, labelled, tmp_path_factory, moespec_cache, monkeypatch_module) -> dict:
    out = tmp_path_factory.mktemp("report_out")
    main([str(smoke_run), "--data", str(labelled), "--out", str(out), "--batch-size", "3",
          "--top", "5", "--snippets", "2", "--no-progress"])  # fmt: skip
    return {"json": json.loads((out / "report.json").read_text()), "out": out}


@pytest.fixture(scope="module")
def monkeypatch_module(moespec_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOESPEC_CACHE", str(moespec_cache))
    mp.setenv("WANDB_MODE", "offline")
    yield mp
    mp.undo()


def _windows(tokenizer, path: Path, seq_len: int) -> list[tuple[list[int], list[str | None]]]:
    """The documents tokenized (EOS appended), concatenated, cut into windows of seq_len."""
    ids, doms = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        new = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids += new
        doms += [row.get("domain")] * len(new)
    return [(ids[i : i + seq_len], doms[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


@pytest.fixture(scope="module")
def reference(smoke_run, labelled, report, trace_routing) -> dict:
    """Per layer, per token: (token id, domain, chosen experts, scores, k expert outputs)."""
    from moespec.train.runs import load_model

    loaded = load_model(smoke_run, [])
    model, tok = loaded.model.eval(), loaded.data.tokenizer
    tokens = []
    with trace_routing(model) as seen, torch.no_grad():
        for ids, doms in _windows(tok, labelled, loaded.cfg.data.seq_len):
            model(torch.tensor([ids]))
            tokens += list(zip(ids, doms))
    return {"tokens": tokens, "layers": seen, "tokenizer": tok}


def test_every_number_matches_a_plain_loop(report, reference):
    rep = report["json"]
    tokens, tok = reference["tokens"], reference["tokenizer"]
    domains = sorted(DOMAINS)
    assert rep["data"]["domains"] == domains
    (model,) = rep["models"]
    assert model["tokens"] == len(tokens) == rep["data"]["tokens"]
    for layer, per_token in zip(model["layers"], reference["layers"]):
        e = model["num_experts"]
        slots = [0] * e
        joint = [[0] * len(domains) for _ in range(e)]
        co = [[0] * e for _ in range(e)]
        by_expert = [Counter() for _ in range(e)]
        sim = defaultdict(list)
        entropy = []
        overlap = []
        for (token, dom), (chosen, scores, ys) in zip(tokens, per_token):
            entropy.append(-sum(p * math.log(p) for p in scores if p > 0))
            pairs = []
            for a in chosen:
                slots[a] += 1
                by_expert[a][token] += 1
                if dom is not None:
                    joint[a][domains.index(dom)] += 1
                for b in chosen:
                    co[a][b] += 1
            for i in range(len(chosen)):
                for j in range(len(chosen)):
                    if i != j:
                        c = float(torch.nn.functional.cosine_similarity(ys[i], ys[j], dim=0))
                        sim[(chosen[i], chosen[j])].append(c)
                        pairs.append(abs(c))
            overlap.append(sum(pairs) / len(pairs))
        n = len(tokens)
        total = sum(slots)
        assert layer["slots"] == slots
        assert layer["load"] == pytest.approx([s / total for s in slots])
        np.testing.assert_allclose(layer["coactivation"], np.array(co) / n, rtol=1e-12)
        assert layer["domain_slots"] == joint
        for row, share in zip(joint, layer["expert_domain_share"]):
            assert share == pytest.approx([c / sum(row) for c in row] if sum(row) else [0] * 3)
        # I(expert; domain) / H(domain) from the joint counts
        grand = sum(map(sum, joint))
        pe = [sum(r) / grand for r in joint]
        pd = [sum(r[d] for r in joint) / grand for d in range(len(domains))]
        mi = sum((c / grand) * math.log((c / grand) / (pe[a] * pd[d]))
                 for a, r in enumerate(joint) for d, c in enumerate(r) if c)  # fmt: skip
        hd = -sum(p * math.log(p) for p in pd if p)
        m = layer["metrics"]
        assert m["domain_mi"] == pytest.approx(mi / hd, rel=1e-9)
        mean = total / e
        assert m["maxvio"] == pytest.approx(max(abs(s - mean) for s in slots) / mean)
        assert m["routing_entropy"] == pytest.approx(sum(entropy) / n, rel=1e-5)
        assert m["output_overlap"] == pytest.approx(sum(overlap) / n, abs=1e-5)
        jac = [co[a][b] / (co[a][a] + co[b][b] - co[a][b]) if co[a][a] + co[b][b] - co[a][b]
               else 0.0 for a in range(e) for b in range(e) if a != b]  # fmt: skip
        assert m["token_overlap"] == pytest.approx(sum(jac) / len(jac))
        assert layer["near_dead"] == [a for a in range(e) if slots[a] / total < 0.1 / e]
        for a in range(e):
            for b in range(e):
                got = layer["similarity"][a][b]
                want = sim.get((a, b))
                assert (got is None) == (want is None)
                if want:
                    assert got == pytest.approx(sum(want) / len(want), abs=1e-5)
        freq = Counter(t for t, _ in tokens)
        text = tok.decode([t for t, _ in tokens])
        for a, ex in enumerate(layer["experts"]):
            counts = by_expert[a]
            share = sorted(counts, key=lambda v: (-counts[v], v))[:5]
            assert [r["token"] for r in ex["top_by_share"]] == share
            lift = {v: (counts[v] / slots[a]) / (freq[v] / n) for v in counts if counts[v] >= 5}
            top_lift = sorted(lift, key=lambda v: (-lift[v], v))[:5]
            assert [r["token"] for r in ex["top_by_lift"]] == top_lift
            for r in ex["top_by_share"] + ex["top_by_lift"]:
                assert r["count"] == counts[r["token"]]
                assert r["share"] == pytest.approx(counts[r["token"]] / slots[a])
                assert r["lift"] == pytest.approx(r["share"] / (freq[r["token"]] / n))
                assert r["text"] == tok.decode([r["token"]])
                assert 1 <= len(r["snippets"]) <= 2  # seen >= once: at least one context
                for before, word, after in r["snippets"]:
                    assert word == r["text"] and before + word + after in text


def test_page_embeds_every_figure(report):
    out = report["out"]
    page = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["model0_coactivation.png", "model0_expert_domain.png", "model0_load.png",
                    "model0_similarity.png", "summary.png"]  # fmt: skip
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == len(pngs)
    assert "http" not in page and "<script" not in page


@pytest.mark.slow
@pytest.mark.skipif(
    chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)"
)
def test_page_renders_in_headless_chromium_with_every_figure_loaded(report, tmp_path):

    page = report["out"] / "report.html"
    png = screenshot(page, tmp_path / "page.png", 1200, 1600)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1200, 1600)
        assert len(set(im.convert("L").resize((60, 80)).getdata())) > 10  # not a blank page
    loaded, total = image_status(page)
    assert (loaded, total) == (5, 5)
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("base64,iVBOR", "base64,xxxx", 1))
    assert image_status(broken) == (4, 5)
    with pytest.raises(SystemExit) as stop:  # the command line fails on a broken figure
        browser_main([str(broken), "--screenshot", str(tmp_path / "b.png")])
    assert stop.value.code == 1


def test_browser_check_without_a_page_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        browser_main([str(tmp_path / "none.html"), "--screenshot", str(tmp_path / "p.png")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'none.html'}: no such file (give a report.html)"
    ]


def test_unlabelled_data_runs_without_the_domain_figures(smoke_run, tmp_path, monkeypatch_module):
    text = tmp_path / "plain.txt"
    text.write_text(DOMAINS["prose"] * 20)
    out = tmp_path / "out"
    main([str(smoke_run), "--data", str(text), "--out", str(out), "--snippets", "0",
          "--no-progress"])  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["domains"] == [] and "no domain labels" in rep["data"]["notes"][0]
    assert all("domain_mi" not in ly["metrics"] and "domain_slots" not in ly
               for ly in rep["models"][0]["layers"])  # fmt: skip
    assert not (out / "model0_expert_domain.png").exists()
    assert "no domain labels" in (out / "report.html").read_text()


def test_chat_and_prompt_completion_rows_are_documents(tmp_path):
    """Rows of the SFT formats are read: chat rendered with the chat template, a prompt and
    its completion joined; each document then ends with EOS, as plain text does."""
    from moespec.data.tokenizer import train_bpe_tokenizer
    from moespec.report.data import parse_sources, text_batches

    tok = train_bpe_tokenizer(iter(["what is two plus three it is five"] * 5), 300, chat=True)
    chat = [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "five"}]
    rows = [
        {"messages": chat, "domain": "math"},
        {"prompt": "what is ", "completion": "three", "domain": "words"},
        {"text": "plus five", "domain": "math"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [tok.apply_chat_template(chat, tokenize=False), "what is three", "plus five"]
    expected, doms = [], []
    for text, dom in zip(texts, [0, 1, 0]):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected += ids
        doms += [dom] * len(ids)
    (batch,) = text_batches(parse_sources([str(path)]), tok, ["math", "words"], 512, 4)
    n = int(batch["attention_mask"].sum())
    assert batch["input_ids"][0, :n].tolist() == expected
    assert batch["domain_ids"][0, :n].tolist() == doms


def test_rows_are_padded_with_pad_id_zero(tmp_path):
    """A pad token of id 0 pads (it is not mistaken for a missing one and replaced by EOS)."""
    from moespec.data.tokenizer import train_bpe_tokenizer
    from moespec.report.data import parse_sources, text_batches

    tok = train_bpe_tokenizer(iter(["what is two plus three"] * 5), 300, chat=True)
    tok.pad_token = "<|endoftext|>"
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "what is two"}) + "\n")
    (batch,) = text_batches(parse_sources([str(path)]), tok, [], 64, 4)
    n = int(batch["attention_mask"].sum())
    assert batch["input_ids"][0, n:].tolist() == [0] * (64 - n)


def _fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # log lines may come first
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    return errors[0]


def test_bad_input_is_one_error_line(smoke_run, tmp_path, capsys, monkeypatch_module):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in _fails([str(smoke_run), "--data", str(empty)], capsys)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert "holds no document" in _fails([str(smoke_run), "--data", str(blank)], capsys)
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"domain": "x"}\n')
    assert "rows.jsonl:1: no string field 'text', list of 'messages' or" in _fails(
        [str(smoke_run), "--data", str(no_text)], capsys
    )
    assert "no such directory" in _fails([str(tmp_path / "nope"), "--data", str(no_text)], capsys)
    other = tmp_path / "other"
    shutil.copytree(smoke_run, other)
    overrides = other / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- model.tiny.hidden_size=32\n")
    text = tmp_path / "plain.txt"
    text.write_text("some text " * 50)
    err = _fails([str(other), "--data", str(text), "--out", str(tmp_path / "o")], capsys)
    assert "does not fit the model" in err and "step" in err
