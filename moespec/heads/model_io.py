"""A model directory in and out: loading it (safetensors or GGUF) with its processor or
tokenizer, and greedy generation from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_multimodal(config: Any) -> bool:
    """True if the config belongs to an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def load_model(
    model_dir: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "eager",
) -> tuple[nn.Module, Any]:
    """Model in eval mode and its processor (multimodal) or tokenizer (text) from a local dir."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (model.dir)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (model.dtype); valid: {', '.join(DTYPES)}")
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {path / gguf_file} does not exist (model.gguf_file)")
    if not gguf_file and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; give a transformers model directory or model.gguf_file"
        )
    config = AutoConfig.from_pretrained(path, **extra)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], **extra}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if is_multimodal(config):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        processor = AutoTokenizer.from_pretrained(path, **extra)
    return model.eval(), processor


def generate(
    model: nn.Module, inputs: dict[str, Any], max_new_tokens: int, eos: Any = None
) -> torch.Tensor:
    """Greedy generation for one prompt; returns only the new token ids."""
    batch = {k: v for k, v in inputs.items() if k != "span"}
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if eos is not None:
        kwargs["pad_token_id"] = eos
    with torch.inference_mode():
        out = model.generate(**batch, **kwargs)
    return out[0, batch["input_ids"].shape[-1] :]
