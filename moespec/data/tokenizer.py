"""Tokenizers of the data pipeline: a byte-level BPE trained on the corpus, or one loaded from disk.

A BPE tokenizer trained for chat data also gets the ChatML tokens and template (the one
SmolLM2 and Qwen use), with ``{% generation %}`` marks around the assistant's text, and ends
turns (its EOS) with ``<|im_end|>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moespec.cache import content_hash, file_lock, publish_dir, staging_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe_tokenizer(
    texts: Iterator[str], vocab_size: int, chat: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` (EOS) and ``<|pad|>``; with
    ``chat``, also ``<|im_start|>``/``<|im_end|>`` (EOS) and :data:`CHATML_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 for byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *([IM_START, IM_END] if chat else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if not chat:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary/merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab()))
    extra = [tokenizer.eos_token, getattr(tokenizer, "chat_template", None)]
    return content_hash([hashlib.sha256(body.encode()).hexdigest(), extra])


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A tokenizer saved in a local directory (never the Hub)."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: tokenizer directory not found (or use tokenizer='bpe')")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id; a clear error when it has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one")
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS (id 0 is a valid pad)."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else eos_id(tokenizer)


def cached_bpe_tokenizer(
    cache: Path,
    key: Any,
    vocab_size: int,
    texts: Callable[[], Iterable[str]],
    chat: bool = False,
) -> PreTrainedTokenizerFast:
    """The BPE tokenizer of ``key`` (what it is trained on) from ``cache``, trained on
    ``texts()`` and published there first if no run has done so (one run at a time)."""
    name = content_hash([key, vocab_size, "chatml"] if chat else [key, vocab_size])
    tok_dir = cache / "tokenizers" / f"bpe-{name}"
    with file_lock(cache / "locks" / f"{tok_dir.name}.lock"):
        if not (tok_dir / "tokenizer.json").is_file():
            tmp = staging_dir(tok_dir)
            train_bpe_tokenizer(iter(texts()), vocab_size, chat).save_pretrained(str(tmp))
            publish_dir(tmp, tok_dir)
    return load_tokenizer(str(tok_dir))
