"""JSONL examples for the head CLI and turning them into model inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MARKERS = ("<ctx>", "</ctx>")
_OPEN, _CLOSE = "\ue000", "\ue001"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ExampleError(ValueError):
    """A JSONL line that cannot be used; the message names file, line and problem."""


@dataclass
class Example:
    """One JSONL line: an image or a text context, a question, optional choices and answer."""

    source: str
    question: str = ""
    text: str | None = None
    image: Path | None = None
    choices: list[str] | None = None
    answer: str | None = None
    span: tuple[int, int] | None = None

    def prompt_text(self) -> str:
        """The user message text: context, question and lettered choices."""
        parts = [self.text] if self.text else []
        if self.question:
            parts.append(self.question)
        if self.choices:
            parts.append("\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(self.choices)))
            parts.append("Answer with the option's letter from the given choices directly.")
        return "\n\n".join(parts)


def parse_example(
    data: Any, source: str, base_dir: Path, markers: tuple[str, str] = DEFAULT_MARKERS
) -> Example:
    """Validate one decoded JSONL object; raises ExampleError naming ``source``."""
    if not isinstance(data, dict):
        raise ExampleError(f"{source}: expected a JSON object, got {type(data).__name__}")
    question, text = data.get("question", ""), data.get("text")
    for key, value in (("question", question), ("text", text)):
        if value is not None and not isinstance(value, str):
            raise ExampleError(f"{source}: '{key}' must be a string")
    if not question and not text:
        raise ExampleError(f"{source}: needs a 'question' or a 'text' field")
    image = None
    if data.get("image") is not None:
        image = Path(data["image"])
        image = image if image.is_absolute() else base_dir / image
        if not image.is_file():
            raise ExampleError(
                f"{source}: image file '{data['image']}' not found (looked at {image})"
            )
    span = _parse_span(data.get("span"), text, source, markers)
    if span is not None and text is not None and markers[0] in text:
        text = text.replace(markers[0], "").replace(markers[1], "")
    choices = data.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(_LETTERS)
    ):
        raise ExampleError(f"{source}: 'choices' must be a list of 2 to 26 strings")
    answer = data.get("answer")
    if answer is not None:
        if isinstance(answer, int) and choices:
            if not 0 <= answer < len(choices):
                raise ExampleError(
                    f"{source}: answer index {answer} is not in 0..{len(choices) - 1}"
                )
            answer = _LETTERS[answer]
        answer = str(answer)
    return Example(
        source, question, text, image, [str(c) for c in choices or []] or None, answer, span
    )


def _parse_span(
    span: Any, text: str | None, source: str, markers: tuple[str, str]
) -> tuple[int, int] | None:
    """Character span of the context in ``text``: the 'span' field, the markers, or None."""
    has_marker = text is not None and markers[0] in text
    if span is not None:
        if has_marker:
            raise ExampleError(
                f"{source}: give either 'span' or {markers[0]}...{markers[1]}, not both"
            )
        if text is None:
            raise ExampleError(f"{source}: 'span' needs a 'text' field to point into")
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(s, int) for s in span)
        if not ok or not 0 <= span[0] < span[1] <= len(text):
            raise ExampleError(
                f"{source}: 'span' must be [start, end] character offsets with "
                f"0 <= start < end <= {len(text)}, got {span!r}"
            )
        return int(span[0]), int(span[1])
    if has_marker:
        start = text.index(markers[0])
        end = text.find(markers[1], start)
        if end < 0:
            raise ExampleError(f"{source}: {markers[0]} without a closing {markers[1]}")
        return start, end - len(markers[0])
    return None


def read_jsonl(
    path: str | Path, markers: tuple[str, str] = DEFAULT_MARKERS, limit: int | None = None
) -> tuple[list[Example], list[tuple[str, str]]]:
    """All valid examples of a JSONL file and the (source, reason) of every invalid line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    examples, failures = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(examples) + len(failures) >= limit:
            break
        source = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            failures.append((source, f"{source}: not valid JSON ({err.msg})"))
            continue
        try:
            examples.append(parse_example(data, source, path.parent, markers))
        except ExampleError as err:
            failures.append((source, str(err)))
    return examples, failures


def load_examples(
    path: str | Path, markers: tuple[str, str] = DEFAULT_MARKERS, limit: int | None = None
) -> list[Example]:
    """The examples of a JSONL file; raises ExampleError on the first invalid line."""
    examples, failures = read_jsonl(path, markers, limit)
    if failures:
        more = f" (and {len(failures) - 1} more invalid lines)" if len(failures) > 1 else ""
        raise ExampleError(failures[0][1] + more)
    if not examples:
        raise ExampleError(f"{path}: no examples")
    return examples


class PromptEncoder:
    """Turns examples into model inputs with the model's processor or tokenizer."""

    def __init__(self, processor: Any, *, chat_template: bool = True, system: str | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.use_chat_template = chat_template
        self.system = system

    def _messages(self, content: Any) -> list[dict[str, Any]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return [*messages, {"role": "user", "content": content}]

    def _render_text(self, user_text: str) -> str:
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                self._messages(user_text), add_generation_prompt=True, tokenize=False
            )
        if self.use_chat_template and getattr(self.processor, "chat_template", None):
            content = [{"type": "text", "text": user_text}]
            return self.processor.apply_chat_template(
                self._messages(content), add_generation_prompt=True, tokenize=False
            )
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{user_text}"

    def encode(self, example: Example, with_span: bool = False) -> dict[str, Any]:
        """Model inputs (batch of 1); ``with_span`` adds the token span of the text context.

        The token ids are the same with and without ``with_span``: the rendered prompt is
        tokenized once, and the span is made of the tokens whose character offsets overlap the
        context (this needs a fast tokenizer, which reports offsets).
        """
        if example.image is not None:
            return self._encode_image(example)
        user_text = example.prompt_text()
        rendered = self._render_text(user_text)
        if not with_span:
            return dict(self.tokenizer(rendered, return_tensors="pt", add_special_tokens=False))
        chars = self._context_chars(example, user_text, rendered)
        encoded = self.tokenizer(
            rendered, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True
        )
        offsets = encoded.pop("offset_mapping", None)
        if offsets is None:
            raise ValueError(
                f"{type(self.tokenizer).__name__} gives no character offsets "
                "(return_offsets_mapping), so the context span cannot be mapped to tokens; "
                "use a fast tokenizer (tokenizer.json, use_fast=True)"
            )
        inside = [
            i
            for i, (a, b) in enumerate(offsets[0].tolist())
            if b > a and a < chars[1] and b > chars[0]
        ]
        if not inside:
            raise ExampleError(f"{example.source}: the context span is empty after tokenization")
        return {**dict(encoded), "span": (inside[0], inside[-1] + 1)}

    def _context_chars(self, example: Example, user_text: str, rendered: str) -> tuple[int, int]:
        """Character span of the text context inside the rendered prompt."""
        assert example.text is not None or example.question
        context = example.text if example.text is not None else example.question
        start, end = example.span or (0, len(context))
        marked = context[:start] + _OPEN + context[start:end] + _CLOSE + context[end:]
        with_marks = self._render_text(user_text.replace(context, marked, 1))
        first = with_marks.find(_OPEN)
        last = with_marks.find(_CLOSE) - len(_OPEN)
        if with_marks.replace(_OPEN, "").replace(_CLOSE, "") == rendered and 0 <= first < last:
            return first, last
        # the chat template changed the text around the marks: find the context text itself
        piece = context[start:end]
        found = rendered.find(piece)
        if found < 0 or rendered.find(piece, found + 1) >= 0:
            raise ExampleError(
                f"{example.source}: cannot locate the context span {piece[:40]!r} in the rendered "
                "prompt (the chat template changes it); set prompt.chat_template=false"
            )
        return found, found + len(piece)

    def _encode_image(self, example: Example) -> dict[str, Any]:
        from PIL import Image

        if getattr(self.processor, "image_processor", None) is None:
            raise ExampleError(
                f"{example.source}: has an 'image' but the model has no image processor; "
                "image lines need a multimodal model directory"
            )
        with Image.open(example.image) as img:
            image = img.convert("RGB")
        user_text = example.prompt_text()
        if self.use_chat_template and getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": user_text}]
            prompt = self.processor.apply_chat_template(
                self._messages(content), add_generation_prompt=True, tokenize=False
            )
        else:
            prompt = f"{self.processor.image_token}\n{user_text}"
        return dict(self.processor(images=[image], text=[prompt], return_tensors="pt"))

    def decode(self, ids: torch.Tensor) -> str:
        """Text of generated token ids, without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
