"""The supervised fine-tuning data cache: rows of prompt/completion or chat sources, tokenized
once into per-split token, trained-flag, offset and domain arrays (:func:`build_sft`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moespec.cache import content_hash, file_lock, publish_dir, staging_dir
from moespec.data.packing import ExampleRows
from moespec.data.pipeline import (
    DataBundle,
    DataConfig,
    load_data_file,
    resolve_sources,
    split_documents,
)
from moespec.data.sft import (
    ExampleEncoder,
    check_columns,
    require_chat_template,
    resolve_format,
    row_texts,
)
from moespec.data.tokenizer import (
    cached_bpe_tokenizer,
    eos_id,
    load_tokenizer,
    pad_id,
    tokenizer_fingerprint,
)
from moespec.paths import default_cache_dir

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("moespec.data")

SFT_CACHE_VERSION = 1


class SftSources:
    """The data files of an SFT config, each loaded once, with its (resolved) format."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self._loaded: list[tuple[Path, datasets.Dataset, str]] | None = None

    def formats(self) -> set[str]:
        """Formats of the sources (loads them only for ``format=auto``)."""
        if self.cfg.source == "embedded":
            return {"text"}
        if self.cfg.format != "auto":
            return {self.cfg.format}
        return {fmt for _, _, fmt in self.load()}

    def describe(self) -> str:
        return ", ".join(f"{p.name}: {fmt}" for p, _, fmt in self.load())

    def load(self) -> list[tuple[Path, datasets.Dataset, str]]:
        if self._loaded is None:
            cfg = self.cfg
            hf_cache = Path(cfg.cache_dir or default_cache_dir()) / "hf-datasets"
            self._loaded = []
            for path in resolve_sources(cfg.source):
                ds = load_data_file(path, hf_cache)
                fmt = resolve_format(cfg, ds.column_names)
                check_columns(cfg, fmt, ds.column_names, str(path))
                self._loaded.append((path, ds, fmt))
        return self._loaded

    def num_rows(self) -> int:
        return sum(len(ds) for _, ds, _ in self.load())

    def rows(self, batch_size: int = 256) -> Iterator[tuple[Path, str, int, list[dict[str, Any]]]]:
        """``(path, format, first_row, rows)`` batches over all sources in order."""
        for path, ds, fmt in self.load():
            cols = ds.column_names
            for start in range(0, len(ds), batch_size):
                batch = ds[start : start + batch_size]
                n = len(batch[cols[0]]) if cols else 0
                yield path, fmt, start, [{c: batch[c][j] for c in cols} for j in range(n)]


def _sft_texts(sources: SftSources, keep: np.ndarray) -> Iterator[str]:
    """The strings of the rows numbered ``keep`` (to train a BPE tokenizer on)."""
    wanted = set(keep.tolist())
    i = 0
    for _, fmt, _, rows in sources.rows():
        for row in rows:
            if i in wanted:
                yield from row_texts(sources.cfg, fmt, row)
            i += 1


def encode_sources(cfg: DataConfig, sources: SftSources, tokenizer: Any):
    """All rows as examples: ``(ids per row, trained per row, domain per row)``."""
    encoder = ExampleEncoder(cfg, tokenizer)
    ids: list[list[int]] = []
    trained: list[list[int]] = []
    doms: list[str | None] = []
    for path, fmt, first, rows in sources.rows():
        if first == 0:
            log.info("tokenizing %s (data.format=%s)", path, fmt)
        for x, m in encoder.encode_rows(fmt, rows, str(path), first):
            ids.append(x)
            trained.append(m)
        for row in rows:
            d = row.get(cfg.domain_field) if cfg.domain_field else None
            doms.append(None if d is None else str(d))
    return ids, trained, doms


def build_sft(
    cfg: DataConfig, sources: SftSources, src_fp: Any, cache: Path, tokenizer: Any, rank: int
) -> DataBundle:
    """The prompt/completion and chat formats: one example per row, see :mod:`.sft`."""
    why = template_reason(cfg, sources)
    texts_key = {
        "v": SFT_CACHE_VERSION,
        "source": src_fp,
        "format": cfg.format,
        "fields": [
            cfg.messages_field,
            cfg.prompt_field,
            cfg.completion_field,
            cfg.prompt_template,
            cfg.domain_field,
        ],
        "split": [cfg.val_fraction, cfg.seed],
    }
    split = _LazySplit(cfg, sources)
    if tokenizer is None:
        tokenizer = _sft_tokenizer(cfg, sources, texts_key, cache, split, chat=why is not None)
    eos_id(tokenizer)  # a tokenizer without EOS is refused here
    if why is not None:
        require_chat_template(tokenizer, why)
    key = {**texts_key, "use_chat_template": cfg.use_chat_template, "train_on": cfg.train_on}
    data_key = content_hash([key, tokenizer_fingerprint(tokenizer)])
    data_dir = cache / "sft" / data_key
    with file_lock(cache / "locks" / f"sft-{data_key}.lock"):
        if not (data_dir / "meta.json").is_file():
            _write_sft_cache(data_dir, cfg, sources, tokenizer, split())
    meta = json.loads((data_dir / "meta.json").read_text())
    pad = pad_id(tokenizer)
    train, val = (_load_sft_rows(data_dir, name, cfg, pad, rank) for name in ("train", "val"))
    if len(train) == 0:
        st = train.stats
        raise ValueError(
            f"no training example left of {st.examples}: {st.too_long} longer than "
            f"data.seq_len={cfg.seq_len} (data.truncation={cfg.truncation}), {st.untrained} "
            "with no trained token; raise data.seq_len, set data.truncation=truncate or check "
            "the data"
        )
    if cfg.val_fraction > 0 and len(val) == 0:
        log.warning("validation split has no example left (data.val_fraction=%s)", cfg.val_fraction)
    return DataBundle(train, val, tokenizer, list(meta["domains"]), data_dir)


class _LazySplit:
    """The train/val row split of the sources, computed (and the rows counted) on first use."""

    def __init__(self, cfg: DataConfig, sources: SftSources) -> None:
        self.cfg, self.sources = cfg, sources
        self._split: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._split is None:
            n = self.sources.num_rows()
            if n == 0:
                raise ValueError(f"data source {self.cfg.source!r} has no rows")
            self._split = split_documents(n, self.cfg.val_fraction, self.cfg.seed)
        return self._split


def template_reason(cfg: DataConfig, sources: SftSources) -> str | None:
    """The setting that makes the data need a chat template (for errors), or ``None``."""
    if cfg.use_chat_template:
        return "data.use_chat_template=true"
    if cfg.format == "chat":
        return "data.format=chat"
    if "chat" in sources.formats():
        return "data.format=auto (the data is read as chat)"
    return None


def _sft_tokenizer(
    cfg: DataConfig,
    sources: SftSources,
    texts_key: dict[str, Any],
    cache: Path,
    split: _LazySplit,
    chat: bool,
) -> Any:
    """``data.tokenizer``: a local directory, or a BPE trained (once, cached) on the train rows,
    with the ChatML tokens and template when the data is ``chat``."""
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)

    def train_texts() -> Iterator[str]:
        train_idx, _ = split()
        log.info("training a %d-token BPE tokenizer on %d rows", cfg.vocab_size, len(train_idx))
        return _sft_texts(sources, train_idx)

    return cached_bpe_tokenizer(cache, texts_key, cfg.vocab_size, train_texts, chat=chat)


def _write_sft_cache(
    data_dir: Path, cfg: DataConfig, sources: SftSources, tokenizer: Any,
    split: tuple[np.ndarray, np.ndarray],
) -> None:  # fmt: skip
    """Tokenize every row and publish each split's tokens, trained flags, offsets, domains."""
    ids, trained, doms = encode_sources(cfg, sources, tokenizer)
    domains = sorted({d for d in doms if d is not None}) if cfg.domain_field else []
    index = {d: i for i, d in enumerate(domains)}
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    tmp = staging_dir(data_dir)
    for name, idx in zip(("train", "val"), split):
        rows = idx.tolist()
        lengths = np.array([len(ids[i]) for i in rows], dtype=np.int64)
        flat = [t for i in rows for t in ids[i]]
        flags = [t for i in rows for t in trained[i]]
        np.save(tmp / f"{name}_tokens.npy", np.array(flat, dtype=dtype))
        np.save(tmp / f"{name}_trained.npy", np.array(flags, dtype=np.uint8))
        np.save(tmp / f"{name}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        dom = [index.get(doms[i], -1) if doms[i] is not None else -1 for i in rows]
        np.save(tmp / f"{name}_domains.npy", np.array(dom, dtype=np.int16))
    meta = {
        "domains": domains,
        "num_rows": {"train": len(split[0]), "val": len(split[1])},
        "vocab": len(tokenizer),
        "config": asdict(cfg),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    publish_dir(tmp, data_dir)


def _load_sft_rows(data_dir: Path, name: str, cfg: DataConfig, pad: int, rank: int) -> ExampleRows:
    """One split of the cache as rows (packed or padded), its drop/truncation counts logged."""
    arrays = [
        np.load(data_dir / f"{name}_{part}.npy", mmap_mode="r")
        for part in ("tokens", "trained", "offsets", "domains")
    ]
    rows = ExampleRows(
        *arrays, cfg.seq_len, pad_id=pad, packing=cfg.packing, truncation=cfg.truncation
    )
    if rank == 0 and rows.stats.examples:
        _report_rows(rows, name, cfg)
    return rows


def _report_rows(rows: ExampleRows, split: str, cfg: DataConfig) -> None:
    st = rows.stats
    if st.too_long and not st.truncated:
        log.warning(
            "%s: dropped %d of %d examples longer than data.seq_len=%d tokens "
            "(data.truncation=drop)",
            split, st.too_long, st.examples, cfg.seq_len,
        )  # fmt: skip
    if st.truncated:
        log.warning(
            "%s: truncated %d of %d examples to data.seq_len=%d tokens (data.truncation=truncate)",
            split, st.truncated, st.examples, cfg.seq_len,
        )  # fmt: skip
    if st.untrained:
        log.warning(
            "%s: dropped %d of %d examples with no trained token left",
            split, st.untrained, st.examples,
        )  # fmt: skip
    log.info(
        "%s: %d examples in %d rows of %d tokens (%s)",
        split, st.kept, st.rows, cfg.seq_len, "packed" if cfg.packing else "padded",
    )  # fmt: skip
