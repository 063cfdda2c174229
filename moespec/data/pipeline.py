"""Data pipeline: load documents, train or load a tokenizer, pack into fixed-length sequences.

:func:`build_data` returns train/validation datasets of ``seq_len`` rows, caching the tokenizer
and token arrays under ``cache_dir``; :func:`moespec.data.sampler.batch_iterator` yields
deterministic, resumable, rank-sharded batches. Every item (and so every batch, with a leading
batch dimension) holds int64 tensors ``input_ids``, ``labels`` (aligned: label t is the token after t, -100 where not
trained), ``domain_ids`` (-1: no domain, padding), ``position_ids``, ``document_ids`` (the
example within the row, -1 on padding) and ``attention_mask`` (1 real, 0 padding).

``data.format=text`` (the default) packs every document into one flat token stream cut into
windows of ``seq_len + 1`` tokens, every token trained (one "document" per window: document
ids 0, positions 0..seq_len-1, no padding). The supervised fine-tuning formats
(``prompt_completion``, ``chat``; :mod:`moespec.data.sft`) give one example per row of the
data with labels only on the trained tokens, packed several to a row or padded one to a row
(:mod:`moespec.data.packing`), cached by :mod:`moespec.data.sft_cache`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from moespec.cache import content_hash, file_lock, publish_dir, staging_dir
from moespec.data import corpus
from moespec.data.packing import ExampleRows
from moespec.data.sft import (
    FORMATS,
    TRAIN_ON,
    TRUNCATION,
    template_fields,
)
from moespec.data.tokenizer import (
    cached_bpe_tokenizer,
    eos_id,
    load_tokenizer,
    tokenizer_fingerprint,
)
from moespec.jsonl import JsonLineError, json_lines
from moespec.paths import default_cache_dir

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DATA_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
_SUPPORTED = ", ".join(DATA_EXTENSIONS) + ", or a datasets save_to_disk directory"


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how it is packed and split."""

    source: str = "embedded"
    text_field: str = "text"
    messages_field: str = "messages"
    domain_field: str | None = "domain"
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    max_chars_per_domain: int = 2_000_000
    seed: int = 0
    cache_dir: str | None = None
    #: text (flat stream, every token trained), prompt_completion, chat, or auto (from the
    #: columns: messages_field -> chat, prompt and completion fields -> prompt_completion)
    format: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    #: str.format template over the row's columns giving the prompt (replaces prompt_field)
    prompt_template: str | None = None
    #: prompt_completion: the prompt as a user turn, the completion as the assistant turn
    use_chat_template: bool = False
    train_on: str = "assistant"  # assistant (completion / assistant turns) or all tokens
    truncation: str = "drop"  # examples longer than seq_len: drop, or truncate (keep the start)
    packing: bool = True  # several examples per row; false: one per row, padded


@dataclass
class DataBundle:
    """Train/validation datasets of ``seq_len`` rows, their tokenizer, and the domain names."""

    train: PackedDataset | ExampleRows
    val: PackedDataset | ExampleRows
    tokenizer: PreTrainedTokenizerFast
    domains: list[str] = field(default_factory=list)
    cache_path: Path | None = None


class PackedDataset(Dataset):
    """Fixed windows over a flat token stream: chunk ``i`` is ``seq_len + 1`` tokens long.

    Each window is one "document" for the model: ``document_ids`` 0, ``position_ids``
    ``0..seq_len-1`` and ``attention_mask`` 1 throughout (attention is plain causal).
    """

    group_lengths = None  # full windows: nothing to group by length

    def __init__(self, tokens: np.ndarray, domains: np.ndarray, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.tokens = tokens
        self.token_domains = domains
        self.seq_len = seq_len
        self._n = len(tokens) // (seq_len + 1)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} sequences")
        start = index * (self.seq_len + 1)
        stop = start + self.seq_len + 1
        chunk = torch.from_numpy(np.asarray(self.tokens[start:stop], dtype=np.int64))
        dom = torch.from_numpy(np.asarray(self.token_domains[start : stop - 1], dtype=np.int64))
        s = self.seq_len
        return {
            "input_ids": chunk[:-1].clone(),
            "labels": chunk[1:].clone(),
            "domain_ids": dom,
            "position_ids": torch.arange(s, dtype=torch.long),
            "document_ids": torch.zeros(s, dtype=torch.long),
            "attention_mask": torch.ones(s, dtype=torch.long),
        }

    @property
    def num_tokens(self) -> int:
        """Number of input tokens over all sequences."""
        return self._n * self.seq_len


def _stat_fingerprint(path: Path) -> list[Any]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p.relative_to(path)), *_stat_fingerprint(p)[1:]] for p in files]
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def resolve_sources(source: str) -> list[Path]:
    """Expand ``source`` (comma list of files/directories) into data files or saved datasets."""
    paths = [s.strip() for s in source.split(",") if s.strip()]
    if not paths:
        raise ValueError(
            "data.source is empty: set data.source=PATH (a JSONL/JSON/Parquet/text file, a "
            "save_to_disk directory, or several in quotes: \"data.source='a.jsonl,b.jsonl'\") "
            "or use data=embedded"
        )
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"{path}: data file not found")
        if path.is_dir():
            if _is_saved_dataset(path):
                out.append(path)
                continue
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
            )
            if not files:
                raise FileNotFoundError(f"{path}: directory has no data files ({_SUPPORTED})")
            out += files
        elif path.suffix.lower() in DATA_EXTENSIONS:
            out.append(path)
        else:
            raise ValueError(
                f"{path}: unsupported data file extension '{path.suffix}' (supported: {_SUPPORTED})"
            )
    return out


def source_fingerprint(cfg: DataConfig) -> Any:
    if cfg.source == "embedded":
        return ["embedded", corpus.embedded_fingerprint(cfg.max_chars_per_domain, cfg.seed)]
    return [_stat_fingerprint(p) for p in resolve_sources(cfg.source)]


def render_messages(messages: Sequence[dict[str, Any]], tokenizer: Any = None) -> str:
    """Render chat ``messages`` with the tokenizer's chat template, else as ``role: content``."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def load_data_file(path: Path, hf_cache: Path) -> datasets.Dataset:
    """One data file (or ``save_to_disk`` directory) as a ``datasets.Dataset``."""
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                return ds["train"]
            if len(ds) == 1:
                return next(iter(ds.values()))
            raise ValueError(f"{path}: saved DatasetDict has splits {list(ds)}; expected 'train'")
        return ds
    builder = DATA_EXTENSIONS[path.suffix.lower()]
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    if not _has_content(path):
        raise ValueError(f"{path}: the file is empty (no rows); give data.source a file with rows")
    try:
        return datasets.load_dataset(
            builder, data_files=[str(path)], split="train", cache_dir=str(hf_cache), **kwargs
        )
    except Exception as err:  # datasets wraps the parser's error in a long traceback
        raise ValueError(unreadable_file_message(path, builder, err)) from None


def _has_content(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether the file holds anything but whitespace (read until the first such byte)."""
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            if block.strip():
                return True
    return False


def unreadable_file_message(path: Path, builder: str, err: Exception) -> str:
    """One line saying why ``path`` could not be read: the first malformed JSON line (1-based)
    of a JSON Lines file, else the loader's own first line."""
    if builder == "json" and path.suffix.lower() in (".jsonl", ".ndjson"):
        try:
            for number, row in json_lines(path):
                if not isinstance(row, dict):
                    return f"{path}:{number}: a JSON Lines row must be an object, got {type(row).__name__}"
        except JsonLineError as bad:
            return f"{path}:{bad.number}: not a JSON object ({bad.msg}); fix or remove that line"
    cause = err.__cause__ or err
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return f"{path}: could not be read as {builder} ({type(cause).__name__}: {first})"


def load_documents(cfg: DataConfig, chat_tokenizer: Any = None) -> datasets.Dataset:
    """Load all documents as a ``datasets.Dataset`` with columns ``text`` and ``domain``.

    ``.txt`` files give one document per blank-line-separated paragraph; chat rows (the
    ``messages_field``) are rendered with :func:`render_messages` using ``chat_tokenizer``.
    """
    import datasets

    if cfg.source == "embedded":
        ds = corpus.embedded_corpus(cfg.max_chars_per_domain, cfg.seed)
        if cfg.domain_field is None:
            ds = ds.map(lambda _: {"domain": None}, features=_doc_features())
        return ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    hf_cache = Path(cfg.cache_dir or default_cache_dir()) / "hf-datasets"
    parts = []
    for path in resolve_sources(cfg.source):
        ds = load_data_file(path, hf_cache)
        cols = ds.column_names
        dom_col = cfg.domain_field if cfg.domain_field in cols else None
        if path.suffix.lower() == ".txt":
            text_col, chat = "text", False
        elif cfg.text_field in cols:
            text_col, chat = cfg.text_field, False
        elif cfg.messages_field in cols:
            text_col, chat = cfg.messages_field, True
        else:
            raise ValueError(
                f"{path}: text field '{cfg.text_field}' (or messages field "
                f"'{cfg.messages_field}') not found; available columns: {cols}"
            )

        def convert(batch: dict[str, list], text_col=text_col, chat=chat, dom_col=dom_col):
            texts = batch[text_col]
            if chat:
                texts = [render_messages(m, chat_tokenizer) if m else "" for m in texts]
            doms = batch[dom_col] if dom_col else [None] * len(texts)
            return {
                "text": [t if isinstance(t, str) else "" for t in texts],
                "domain": [None if d is None else str(d) for d in doms],
            }

        ds = ds.map(
            convert,
            batched=True,
            remove_columns=cols,
            features=_doc_features(),
            desc=f"Reading {path.name}",
        )
        parts.append(ds.filter(lambda r: bool(r["text"].strip())))
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return docs


def _doc_features() -> datasets.Features:
    import datasets

    return datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document-level split: sorted ``(train_indices, val_indices)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n_docs * val_fraction)
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(max(n_val, 1), n_docs - 1)
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def tokenize_documents(
    docs: datasets.Dataset, tokenizer: Any, domains: list[str], *, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize docs (EOS appended) into ``(flat_tokens, flat_domain_ids, doc_offsets)``."""
    eos = eos_id(tokenizer)
    index = {d: i for i, d in enumerate(domains)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not show_progress:
        datasets.disable_progress_bars()
    try:
        enc = docs.map(
            encode,
            batched=True,
            batch_size=256,
            remove_columns=docs.column_names,
            desc="Tokenizing",
        )
    finally:
        if was_enabled and not show_progress:
            datasets.enable_progress_bars()
    col = enc.data.column("input_ids").combine_chunks()
    lengths = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens = col.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    doc_dom = np.array([index.get(d, -1) if d is not None else -1 for d in docs["domain"]])
    token_dom = np.repeat(doc_dom.astype(np.int16), lengths)
    return tokens, token_dom, offsets


def _gather(tokens: np.ndarray, doms: np.ndarray, offsets: np.ndarray, idx: np.ndarray):
    if len(idx) == 0:
        return tokens[:0].copy(), doms[:0].copy()
    pieces = [slice(offsets[i], offsets[i + 1]) for i in idx]
    return np.concatenate([tokens[s] for s in pieces]), np.concatenate([doms[s] for s in pieces])


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ``ValueError`` naming the first invalid ``data.*`` field (sources must exist)."""
    if cfg.seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2, got {cfg.seq_len}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.source == "embedded" and cfg.max_chars_per_domain <= 0:
        raise ValueError(f"data.max_chars_per_domain must be > 0, got {cfg.max_chars_per_domain}")
    if cfg.source != "embedded":
        resolve_sources(cfg.source)  # every file or directory must exist
    if cfg.tokenizer != "bpe" and not Path(cfg.tokenizer).expanduser().is_dir():
        raise FileNotFoundError(
            f"data.tokenizer={cfg.tokenizer!r}: tokenizer directory not found (or use bpe)"
        )
    for key, allowed in (("format", FORMATS), ("train_on", TRAIN_ON), ("truncation", TRUNCATION)):
        value = getattr(cfg, key)
        if value not in allowed:
            raise ValueError(f"data.{key} must be one of {', '.join(allowed)}; got {value!r}")
    for key in ("text_field", "messages_field", "prompt_field", "completion_field"):
        value = getattr(cfg, key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"data.{key} must be a column name, got {value!r}")
    for key in ("use_chat_template", "packing"):
        if not isinstance(getattr(cfg, key), bool):
            raise ValueError(f"data.{key} must be true or false, got {getattr(cfg, key)!r}")
    if cfg.prompt_template is not None:
        template = cfg.prompt_template
        try:
            fields = template_fields(template) if isinstance(template, str) else None
        except ValueError as err:
            raise ValueError(
                f"data.prompt_template={template!r} is not a format string: {err}"
            ) from None
        if not fields:
            raise ValueError(
                f"data.prompt_template={template!r} must name the row's columns in braces, "
                "e.g. '{instruction}\\n{input}\\n'"
            )
    if cfg.source == "embedded" and cfg.format in ("prompt_completion", "chat"):
        raise ValueError(
            f"data.format={cfg.format} needs local data files in data.source; the embedded "
            "corpus is plain text (data.format=text)"
        )


def build_text(cfg: DataConfig, tokenizer: Any, rank: int, cache: Path, src_fp: Any) -> DataBundle:
    """The text format: documents in one token stream cut into ``seq_len`` windows, cached
    under ``cache`` (see :func:`moespec.data.build.build_data`)."""
    doc_key = {
        "v": CACHE_VERSION,
        "source": src_fp,
        "fields": [cfg.text_field, cfg.messages_field, cfg.domain_field],
        "split": [cfg.val_fraction, cfg.seed],
    }
    docs: datasets.Dataset | None = None
    split: tuple[np.ndarray, np.ndarray] | None = None

    def get_docs(chat_tok: Any) -> tuple[datasets.Dataset, tuple[np.ndarray, np.ndarray]]:
        nonlocal docs, split
        if docs is None:
            docs = load_documents(cfg, chat_tok)
            if len(docs) == 0:
                raise ValueError(f"data source {cfg.source!r} has no non-empty documents")
            split = split_documents(len(docs), cfg.val_fraction, cfg.seed)
        return docs, split

    def train_texts() -> list[str]:
        d, (train_idx, _) = get_docs(None)
        log.info("training a %d-token BPE tokenizer on %d docs", cfg.vocab_size, len(d))
        return d.select(train_idx)["text"]

    if tokenizer is None and cfg.tokenizer == "bpe":
        tokenizer = cached_bpe_tokenizer(cache, doc_key, cfg.vocab_size, train_texts)
    elif tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    eos_id(tokenizer)

    data_key = content_hash([doc_key, tokenizer_fingerprint(tokenizer)])
    data_dir = cache / "packed" / data_key
    with file_lock(cache / "locks" / f"{data_key}.lock"):
        if not (data_dir / "meta.json").is_file():
            d, (train_idx, val_idx) = get_docs(tokenizer)
            domains = sorted({x for x in d["domain"] if x is not None}) if cfg.domain_field else []
            tokens, doms, offsets = tokenize_documents(
                d, tokenizer, domains, show_progress=rank == 0
            )
            tmp = staging_dir(data_dir)
            for name, idx in (("train", train_idx), ("val", val_idx)):
                t, dm = _gather(tokens, doms, offsets, idx)
                np.save(tmp / f"{name}_tokens.npy", t)
                np.save(tmp / f"{name}_domains.npy", dm)
            meta = {
                "domains": domains,
                "num_docs": {"train": len(train_idx), "val": len(val_idx)},
                "vocab": len(tokenizer),
                "config": asdict(cfg),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            publish_dir(tmp, data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())

    def load(name: str) -> PackedDataset:
        t = np.load(data_dir / f"{name}_tokens.npy", mmap_mode="r")
        dm = np.load(data_dir / f"{name}_domains.npy", mmap_mode="r")
        return PackedDataset(t, dm, cfg.seq_len)

    train, val = load("train"), load("val")
    if len(train) == 0:
        raise ValueError(
            f"data source {cfg.source!r} has fewer than seq_len+1={cfg.seq_len + 1} "
            "training tokens; lower seq_len or add data"
        )
    if cfg.val_fraction > 0 and len(val) == 0:
        log.warning("validation split is shorter than one sequence of %d tokens", cfg.seq_len)
    return DataBundle(train, val, tokenizer, list(meta["domains"]), data_dir)
