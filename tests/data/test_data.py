"""Tests of the data pipeline: embedded corpus, packing, sources, cache, batches, errors."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from moespec.data import corpus
from moespec.data import pipeline as data
from moespec.data.build import build_data
from moespec.data.pipeline import (
    DataConfig,
    PackedDataset,
    load_documents,
    render_messages,
    split_documents,
)
from moespec.data.sampler import batch_iterator

SMALL = 50_000


def _cfg(cache: Path, **kw) -> DataConfig:
    base = {
        "max_chars_per_domain": SMALL,
        "vocab_size": 512,
        "seq_len": 64,
        "val_fraction": 0.0,
        "cache_dir": str(cache),
    }
    return DataConfig(**{**base, **kw})


def _reference(docs, tokenizer, domains: list[str], seq_len: int):
    """Plain-loop packing: tokenize each doc, append EOS, concatenate, cut into windows."""
    stream, dom = [], []
    for text, d in zip(docs["text"], docs["domain"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        stream += ids
        dom += [domains.index(d) if d in domains else -1] * len(ids)
    out = []
    for i in range(len(stream) // (seq_len + 1)):
        chunk = stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        out.append((chunk[:-1], chunk[1:], dom[i * (seq_len + 1) : (i + 1) * (seq_len + 1) - 1]))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int = 60) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [
        {
            "text": f"doc{i:03d} " + " ".join(words[(i + j) % 6] for j in range(40)),
            "domain": ["news", "math"][i % 2],
            "extra": i,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moespec-cache")


@pytest.fixture(scope="module")
def embedded(cache):
    cfg = _cfg(cache)
    return cfg, build_data(cfg)


def test_embedded_corpus_domains_and_sources():
    ds = corpus.embedded_corpus(SMALL, seed=0)
    assert set(ds["domain"]) == {"bible", "code", "prose"}
    for dom in corpus.DOMAINS:
        texts = [t for t, d in zip(ds["text"], ds["domain"]) if d == dom]
        assert texts and all(t.strip() for t in texts)
        assert sum(map(len, texts)) <= SMALL
    verses = set()
    with corpus.kjv_path().open() as f:
        for line in f:
            verses.add(json.loads(line)["text"])
    assert len(verses) > 30_000
    bible = [t for t, d in zip(ds["text"], ds["domain"]) if d == "bible"]
    for doc in bible:
        for line in doc.splitlines()[1:]:
            assert line.split(" ", 1)[1] in verses
    first = next(corpus.bible_documents())
    assert first.startswith("Genesis 1\n") and "In the beginning God created" in first
    code = [t for t, d in zip(ds["text"], ds["domain"]) if d == "code"]
    assert any("def " in t or "import " in t for t in code)
    assert corpus.embedded_corpus(SMALL, seed=0)["text"] == ds["text"]
    assert "bible" not in sys.modules
    stray = sys.modules.get("tests")
    assert stray is None or "site-packages" not in str(getattr(stray, "__file__", ""))


def test_packing_matches_plain_loop(embedded):
    cfg, bundle = embedded
    assert bundle.domains == ["bible", "code", "prose"]
    assert len(bundle.val) == 0
    docs = load_documents(cfg)
    ref = _reference(docs, bundle.tokenizer, bundle.domains, cfg.seq_len)
    assert len(ref) == len(bundle.train) > 10
    for i, (inp, lab, dom) in enumerate(ref):
        item = bundle.train[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (cfg.seq_len,)
        assert item["input_ids"].tolist() == inp
        assert item["labels"].tolist() == lab
        assert item["domain_ids"].tolist() == dom
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:])
    all_doms = torch.cat([bundle.train[i]["domain_ids"] for i in range(len(bundle.train))])
    assert set(all_doms.tolist()) == {0, 1, 2}


def test_cache_hit_is_fast_and_identical(embedded, monkeypatch):
    cfg, bundle = embedded

    def boom(*a, **k):
        raise AssertionError("corpus rebuilt on a cache hit")

    monkeypatch.setattr(corpus, "embedded_corpus", boom)
    start = time.perf_counter()
    again = build_data(cfg)
    assert time.perf_counter() - start < 2.0
    assert len(again.train) == len(bundle.train)
    for i in (0, len(bundle.train) // 2, len(bundle.train) - 1):
        for key in ("input_ids", "labels", "domain_ids"):
            assert torch.equal(again.train[i][key], bundle.train[i][key])
    assert again.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()


def test_changed_config_misses_cache(embedded):
    cfg, bundle = embedded
    other = build_data(DataConfig(**{**cfg.__dict__, "seed": 1}))
    assert other.cache_path != bundle.cache_path


def test_validation_split_disjoint_by_document(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", _rows(60))
    cfg = _cfg(tmp_path / "c", source=str(src), vocab_size=300, seq_len=16, val_fraction=0.2)
    bundle = build_data(cfg)
    tok = bundle.tokenizer

    def doc_ids(ds: PackedDataset) -> list[str]:
        stream = np.asarray(ds.tokens).tolist()
        out, cur = [], []
        for t in stream:
            if t == tok.eos_token_id:
                out.append(tok.decode(cur).split(" ", 1)[0])
                cur = []
            else:
                cur.append(t)
        return out

    train, val = doc_ids(bundle.train), doc_ids(bundle.val)
    assert len(val) == 12 and len(train) == 48
    assert not set(train) & set(val)
    assert set(train) | set(val) == {f"doc{i:03d}" for i in range(60)}
    tr_idx, va_idx = split_documents(60, 0.2, cfg.seed)
    assert val == [f"doc{i:03d}" for i in va_idx]
    assert train == [f"doc{i:03d}" for i in tr_idx]
    assert bundle.domains == ["math", "news"]
    assert len(bundle.val) > 0
    assert split_documents(60, 0.2, 1)[1].tolist() != va_idx.tolist()


def test_local_sources_all_formats(tmp_path):
    import datasets

    rows = _rows(8)
    jsonl = _write_jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "b.json"
    js.write_text(json.dumps(rows))
    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    txt = tmp_path / "d.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n\n\nthird one\n")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    texts = [r["text"] for r in rows]
    for src in (jsonl, js, pq, saved):
        docs = load_documents(_cfg(tmp_path / "c", source=str(src)))
        assert docs["text"] == texts and docs["domain"] == [r["domain"] for r in rows]
    docs = load_documents(_cfg(tmp_path / "c", source=str(txt)))
    assert [t.strip() for t in docs["text"]] == [
        "first paragraph\nstill first",
        "second paragraph",
        "third one",
    ]
    assert docs["domain"] == [None] * 3
    both = load_documents(_cfg(tmp_path / "c", source=f"{jsonl},{txt}"))
    assert len(both) == len(rows) + 3
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "x.jsonl", rows[:3])
    _write_jsonl(folder / "y.jsonl", rows[3:])
    assert load_documents(_cfg(tmp_path / "c", source=str(folder)))["text"] == texts
    bundle = build_data(
        _cfg(tmp_path / "c", source=f"{jsonl},{txt}", vocab_size=300, seq_len=8),
    )
    assert bundle.domains == ["math", "news"]
    assert set(torch.cat([x["domain_ids"] for x in bundle.train]).tolist()) == {-1, 0, 1}
    no_dom = build_data(
        _cfg(tmp_path / "c", source=str(jsonl), vocab_size=300, seq_len=8, domain_field=None)
    )
    assert no_dom.domains == []
    assert set(torch.cat([x["domain_ids"] for x in no_dom.train]).tolist()) == {-1}


def test_messages_field_and_chat_template(tmp_path, embedded):
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "yo"},
            ]
        }
        for i in range(5)
    ]
    src = _write_jsonl(tmp_path / "chat.jsonl", chats)
    docs = load_documents(_cfg(tmp_path / "c", source=str(src)))
    assert docs["text"][0] == "user: hi 0\nassistant: yo"
    tok = embedded[1].tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    try:
        assert render_messages(chats[1]["messages"], tok) == "<user>hi 1<assistant>yo"
        docs = load_documents(_cfg(tmp_path / "c", source=str(src)), chat_tokenizer=tok)
        assert docs["text"][2] == "<user>hi 2<assistant>yo"
        bundle = build_data(_cfg(tmp_path / "c", source=str(src), seq_len=4), tokenizer=tok)
        assert bundle.tokenizer is tok and len(bundle.train) > 0
    finally:
        tok.chat_template = None


def test_local_tokenizer_directory(tmp_path, embedded):
    cfg, bundle = embedded
    tok_dir = tmp_path / "tok"
    bundle.tokenizer.save_pretrained(str(tok_dir))
    src = _write_jsonl(tmp_path / "d.jsonl", _rows(10))
    from_dir = build_data(_cfg(tmp_path / "c", source=str(src), tokenizer=str(tok_dir)))
    from_obj = build_data(_cfg(tmp_path / "c", source=str(src)), tokenizer=bundle.tokenizer)
    assert from_dir.cache_path == from_obj.cache_path
    assert torch.equal(from_dir.train[0]["input_ids"], from_obj.train[0]["input_ids"])


def test_concurrent_ranks_build_once(tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "d.jsonl", _rows(30))
    cfg = _cfg(tmp_path / "c", source=str(src), vocab_size=300, seq_len=8)
    calls = []
    real = data.tokenize_documents

    def counting(*a, **k):
        calls.append(1)
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(data, "tokenize_documents", counting)
    results: dict[int, data.DataBundle] = {}

    def run(rank: int) -> None:
        results[rank] = build_data(cfg, rank=rank)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert torch.equal(results[0].train[0]["input_ids"], results[1].train[0]["input_ids"])
    assert not [p for p in (tmp_path / "c" / "packed").iterdir() if p.name.startswith(".tmp")]


def _toy(n: int = 23) -> PackedDataset:
    tokens = np.arange(n * 3, dtype=np.int32)
    return PackedDataset(tokens, np.zeros(n * 3, dtype=np.int16), seq_len=2)


def _firsts(batch) -> list[int]:
    return (batch["input_ids"][:, 0] // 3).tolist()


def test_batch_iterator_resume_equals_skip():
    ds = _toy()
    full = batch_iterator(ds, 4, seed=3)
    assert full.sampler.batches_per_epoch == 5
    ref = [_firsts(next(full)) for _ in range(17)]
    assert sorted(sum(ref[:5], [])) == sorted(set(sum(ref[:5], [])))
    assert ref[:5] != ref[5:10]
    for n in (0, 3, 5, 7, 12):
        resumed = batch_iterator(ds, 4, seed=3, start_batch=n)
        assert [_firsts(next(resumed)) for _ in range(17 - n)] == ref[n:]
    it = batch_iterator(ds, 4, seed=3)
    for _ in range(7):
        next(it)
    state = it.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    fresh = batch_iterator(ds, 4, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert [_firsts(next(fresh)) for _ in range(10)] == ref[7:17]
    assert [_firsts(next(it)) for _ in range(10)] == ref[7:17]
    batch = next(batch_iterator(ds, 4, seed=3))
    assert set(batch) == {
        "input_ids", "labels", "domain_ids", "position_ids", "document_ids", "attention_mask"
    }  # fmt: skip
    assert all(v.shape == (4, 2) and v.dtype == torch.long for v in batch.values())
    assert batch["position_ids"].tolist() == [[0, 1]] * 4  # one plain causal window per row
    assert batch["document_ids"].eq(0).all() and batch["attention_mask"].eq(1).all()


def test_batch_iterator_rank_shards_disjoint():
    ds = _toy(40)
    world = 3
    global_ref = batch_iterator(ds, 6, seed=1)
    shards = [batch_iterator(ds, 2, seed=1, rank=r, world_size=world) for r in range(world)]
    for _ in range(8):
        parts = [_firsts(next(s)) for s in shards]
        assert all(len(p) == 2 for p in parts)
        flat = sum(parts, [])
        assert len(set(flat)) == len(flat)
        assert flat == _firsts(next(global_ref))
    once = batch_iterator(ds, 3, seed=0, shuffle=False, drop_last=False, num_epochs=1)
    assert sum((_firsts(b) for b in once), []) == list(range(40))


def test_errors_are_clear(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        build_data(_cfg(tmp_path, source=str(missing)))
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unsupported data file extension '\.csv'.*\.jsonl"):
        build_data(_cfg(tmp_path, source=str(bad)))
    src = _write_jsonl(tmp_path / "d.jsonl", _rows(4))
    with pytest.raises(ValueError, match=r"text field 'body'.*available columns: \['text'"):
        build_data(_cfg(tmp_path, source=str(src), text_field="body"))
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_data(_cfg(tmp_path, source=str(empty)))
    with pytest.raises(ValueError, match="seq_len must be >= 2, got 1"):
        build_data(_cfg(tmp_path, seq_len=1))
    with pytest.raises(ValueError, match="val_fraction"):
        build_data(_cfg(tmp_path, val_fraction=1.0))
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        build_data(_cfg(tmp_path, source=str(src), tokenizer=str(tmp_path / "tok")))
    with pytest.raises(ValueError, match="no full global batch"):
        batch_iterator(_toy(3), 4)
