"""The data of a recipe: :func:`build_data` picks the pipeline of the sources' format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..paths import default_cache_dir
from .pipeline import DataBundle, DataConfig, build_text, source_fingerprint, validate_data_config
from .sft_cache import SftSources, build_sft


def build_data(cfg: DataConfig, *, tokenizer: Any = None, rank: int = 0) -> DataBundle:
    """Load, tokenize, split and pack the data of ``cfg``, using the on-disk cache when valid.

    ``tokenizer`` overrides ``cfg.tokenizer``. A file lock lets concurrent ranks share one
    build; the trainer calls rank 0 first and the other ranks after a barrier, so they only
    read the cache. Only rank 0 shows progress bars.
    """
    validate_data_config(cfg)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    src_fp = source_fingerprint(cfg)
    if cfg.format != "text":
        sources = SftSources(cfg)
        formats = sources.formats()
        if "text" not in formats:
            return build_sft(cfg, sources, src_fp, cache, tokenizer, rank)
        if formats != {"text"}:
            raise ValueError(
                "data.format=auto reads these sources as different formats "
                f"({sources.describe()}); plain text cannot be mixed with prompt/completion or "
                "chat examples: set data.format or split the sources"
            )
    return build_text(cfg, tokenizer, rank, cache, src_fp)
