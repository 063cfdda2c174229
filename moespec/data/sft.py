"""Supervised fine-tuning examples: data formats and the tokens each example trains on.

The formats and field names follow TRL's ``SFTTrainer``:

* ``prompt_completion``: a prompt (``data.prompt_field``, or ``data.prompt_template`` formatted
  over the row) and a completion (``data.completion_field``). Prompt and completion are
  tokenized separately and concatenated; the completion and an appended EOS are trained. With
  ``data.use_chat_template`` the prompt becomes a user turn and the completion the assistant
  turn. Conversational values (lists of role/content messages, TRL's conversational
  prompt-completion) are joined into one conversation whose completion turns are trained.
* ``chat``: ``data.messages_field`` holds a list of ``{"role", "content"}`` messages, rendered
  with the tokenizer's chat template; the assistant turns are trained (``train_on=assistant``)
  or every token (``train_on=all``).

Each example is a token list ``ids`` and a 0/1 list ``trained`` of the same length:
``trained[t]`` says whether ``ids[t]`` is a target of the loss. Assistant tokens are located
from the template itself, never by looking for role names in the rendered text: with the
template's ``{% generation %}`` markers where it has them, otherwise by rendering prefixes of
the conversation: assistant turn ``i`` spans from the end of ``messages[:i]`` rendered with the
generation prompt to the end of ``messages[:i+1]``, so its end-of-turn token is trained and its
header is not. Every prefix's tokens must be a prefix of the whole conversation's tokens; a
template that breaks that is refused with an error that says so.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

FORMATS = ("text", "prompt_completion", "chat", "auto")
TRAIN_ON = ("assistant", "all")
TRUNCATION = ("drop", "truncate")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Example = tuple[list[int], list[int]]


class DataError(ValueError):
    """A row, source or template that cannot give an example (one line, naming where)."""


def template_fields(template: str) -> list[str]:
    """Field names a ``str.format`` template uses (``ValueError`` when it does not parse)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name or name.isdigit():
                raise ValueError("positional fields ('{}', '{0}') are not allowed; name a column")
            names.append(re.split(r"[.\[]", name, maxsplit=1)[0])
    return names


def resolve_format(cfg: Any, columns: Sequence[str]) -> str:
    """The format of a source with ``columns``: ``cfg.format``, or guessed for ``auto``."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in columns:
        return "chat"
    has_prompt = cfg.prompt_template is not None or cfg.prompt_field in columns
    if has_prompt and cfg.completion_field in columns:
        return "prompt_completion"
    return "text"


def check_columns(cfg: Any, fmt: str, columns: Sequence[str], where: str) -> None:
    """Refuse a source whose columns lack what ``fmt`` reads."""
    cols = list(columns)
    if fmt == "chat":
        need = [("data.messages_field", cfg.messages_field)]
    elif fmt == "prompt_completion":
        need = [("data.completion_field", cfg.completion_field)]
        if cfg.prompt_template is None:
            need.insert(0, ("data.prompt_field", cfg.prompt_field))
        else:
            need += [("data.prompt_template", f) for f in template_fields(cfg.prompt_template)]
    else:
        return
    for key, name in need:
        if name not in cols:
            raise DataError(
                f"{where}: {key} column '{name}' not found (data.format={fmt}); "
                f"available columns: {cols}"
            )


def row_texts(cfg: Any, fmt: str, row: dict[str, Any]) -> list[str]:
    """The plain strings of a row (to train a BPE tokenizer on)."""
    if fmt == "chat":
        messages = row.get(cfg.messages_field) or []
        return [m["content"] for m in messages if isinstance(m, dict) and _is_str(m.get("content"))]
    out = []
    for value in (_prompt_value(cfg, row, None), row.get(cfg.completion_field)):
        if _is_str(value):
            out.append(value)
        elif isinstance(value, list):
            out += [
                m["content"] for m in value if isinstance(m, dict) and _is_str(m.get("content"))
            ]
    return out


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _prompt_value(cfg: Any, row: dict[str, Any], where: str | None) -> Any:
    if cfg.prompt_template is None:
        return row.get(cfg.prompt_field)
    has = sorted(k for k, v in row.items() if v is not None)  # JSON rows: absent = None
    missing = [f for f in template_fields(cfg.prompt_template) if row.get(f) is None]
    try:
        if missing:
            raise KeyError(missing[0])
        return cfg.prompt_template.format(**row)
    except (KeyError, IndexError, AttributeError) as err:
        if where is None:
            return None
        raise DataError(
            f"{where}: data.prompt_template {cfg.prompt_template!r} cannot be formatted "
            f"(no value for {err}); the row has: {has}"
        ) from None


def has_generation_markers(template: str | None) -> bool:
    """Whether a chat template marks assistant text with ``{% generation %}`` blocks."""
    return bool(template) and bool(_GENERATION_TAG.search(template))


def require_chat_template(tokenizer: Any, why: str) -> str:
    """The tokenizer's chat template, or a ``ValueError`` saying that ``why`` needs one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{why} needs a tokenizer with a chat template, and tokenizer {name!r} has none: "
            "set data.tokenizer to a local tokenizer directory with one, or data.tokenizer=bpe "
            "(a BPE tokenizer with the ChatML template)"
        )
    return template


class ExampleEncoder:
    """Turns rows of one format into ``(ids, trained)`` examples with ``tokenizer``."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one")
        self.eos = int(eos)
        self.train_all = cfg.train_on == "all"

    # ------------------------------------------------------------------ rows
    def encode_rows(
        self, fmt: str, rows: Sequence[dict[str, Any]], where: str, first: int
    ) -> list[Example]:
        """Examples of ``rows`` (row numbers from ``first``) of source ``where``."""
        if fmt == "chat":
            return [
                self.encode_chat(
                    self._messages(r, where, first + j), where=f"{where} row {first + j}"
                )
                for j, r in enumerate(rows)
            ]
        if fmt != "prompt_completion":
            raise DataError(f"{where}: no examples for data.format={fmt}")
        pairs = [self._prompt_completion(r, where, first + j) for j, r in enumerate(rows)]
        out: list[Example | None] = [None] * len(rows)
        plain = {j for j, (p, c) in enumerate(pairs) if isinstance(p, str) and isinstance(c, str)}
        plain = set() if self.cfg.use_chat_template else plain
        for j, (p, c) in enumerate(pairs):
            if j in plain:
                continue
            if isinstance(p, str):
                p = [{"role": "user", "content": p}]
            if isinstance(c, str):
                c = [{"role": "assistant", "content": c}]
            rowname = f"{where} row {first + j}"
            msgs = [*self._check_messages(p, rowname), *self._check_messages(c, rowname)]
            out[j] = self.encode_chat(msgs, train_from=len(p), where=rowname)
        if plain:
            idx = sorted(plain)
            done = self.encode_plain([pairs[j][0] for j in idx], [pairs[j][1] for j in idx])
            for j, ex in zip(idx, done):
                out[j] = ex
        return [ex for ex in out if ex is not None]

    def _prompt_completion(self, row: dict[str, Any], where: str, i: int) -> tuple[Any, Any]:
        cfg = self.cfg
        cols = sorted(k for k, v in row.items() if v is not None)  # JSON rows: absent = None
        prompt = _prompt_value(cfg, row, f"{where} row {i}")
        completion = row.get(cfg.completion_field)
        if completion is None:
            raise DataError(
                f"{where} row {i}: no completion field '{cfg.completion_field}' "
                f"(data.completion_field); the row has: {cols}"
            )
        if prompt is None:
            raise DataError(
                f"{where} row {i}: no prompt field '{cfg.prompt_field}' (data.prompt_field); "
                f"the row has: {cols}"
            )
        for key, name, value in (
            ("data.prompt_field", cfg.prompt_field, prompt),
            ("data.completion_field", cfg.completion_field, completion),
        ):
            if not isinstance(value, (str, list)):
                raise DataError(
                    f"{where} row {i}: {key} '{name}' is a {type(value).__name__}, not a string "
                    "or a list of role/content messages"
                )
        return prompt, completion

    def _messages(self, row: dict[str, Any], where: str, i: int) -> list[dict[str, Any]]:
        field = self.cfg.messages_field
        messages = row.get(field)
        if messages is None or (isinstance(messages, list) and not messages):
            raise DataError(f"{where} row {i}: empty conversation in data.messages_field '{field}'")
        return self._check_messages(messages, f"{where} row {i}")

    def _check_messages(self, messages: Any, where: str) -> list[dict[str, Any]]:
        field = self.cfg.messages_field
        if not isinstance(messages, list):
            raise DataError(
                f"{where}: '{field}' is a {type(messages).__name__}, not a list of role/content "
                "messages"
            )
        out = []
        for k, m in enumerate(messages):
            m = {a: b for a, b in m.items() if b is not None} if isinstance(m, dict) else m
            ok = (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and bool(m["role"])
                and (isinstance(m.get("content"), (str, list)) or "tool_calls" in m)
            )
            if not ok:
                raise DataError(
                    f"{where}: message {k} is not a role/content dict: {str(m)[:80]!r} (each "
                    "message needs a string 'role' and a 'content')"
                )
            out.append(m)
        return out

    # ------------------------------------------------------------- encodings
    def encode_plain(self, prompts: list[str], completions: list[str]) -> list[Example]:
        """Prompt tokens then completion tokens and EOS; the completion and EOS trained."""
        tok = self.tok
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        c_ids = tok(completions, add_special_tokens=False)["input_ids"] if completions else []
        out = []
        for p, c in zip(p_ids, c_ids):
            c = list(c) if c and c[-1] == self.eos else [*c, self.eos]
            mask = [1] * (len(p) + len(c)) if self.train_all else [0] * len(p) + [1] * len(c)
            out.append(([*p, *c], mask))
        return out

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        if messages:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        # what comes before a first assistant turn: an empty conversation
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[[]],
                chat_template=self.tok.get_chat_template(),
                add_generation_prompt=generation_prompt,
                **self.tok.special_tokens_map,
            )
        except Exception as err:
            raise DataError(
                "the conversation starts with an assistant turn, and the chat template cannot "
                f"render the empty conversation before it ({err}); start it with a user or "
                "system turn, or mark the assistant text with {% generation %}"
            ) from None
        return rendered[0]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def encode_chat(
        self, messages: list[dict[str, Any]], *, train_from: int = 0, where: str = "conversation"
    ) -> Example:
        """A conversation's tokens; trained: the assistant turns from ``messages[train_from]``
        on (every token with ``train_on=all``)."""
        template = require_chat_template(self.tok, "data.format=chat (or data.use_chat_template)")
        if not messages:
            raise DataError(f"{where}: empty conversation")
        turns = [i for i, m in enumerate(messages) if i >= train_from and m["role"] == "assistant"]
        if not turns and not self.train_all:
            raise DataError(
                f"{where}: conversation has no assistant turn to train on "
                f"(roles: {[m['role'] for m in messages]}; data.train_on=assistant)"
            )
        try:
            if self.train_all:
                ids = self._ids([self._render(messages, False)])[0]
                return ids, [1] * len(ids)
            if has_generation_markers(template):
                return self._chat_by_markers(messages, train_from, where)
            return self._chat_by_prefixes(messages, turns, where)
        except DataError as err:
            if str(err).startswith(where):
                raise
            raise DataError(f"{where}: {err}") from None
        except Exception as err:  # jinja2 errors raised by the template itself
            raise DataError(f"{where}: the chat template failed: {err}") from None

    def _chat_by_markers(self, messages: list[dict[str, Any]], train_from: int, where: str):
        out = self.tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if train_from > 0:
            start = self._ids([self._render(messages[:train_from], True)])[0]
            self._check_prefix(start, ids, messages, train_from, where, True)
            mask[: len(start)] = [0] * len(start)
        if not any(mask):
            raise DataError(
                f"{where}: the chat template's {{% generation %}} blocks mark no token of the "
                "assistant turns"
            )
        return ids, mask

    def _chat_by_prefixes(self, messages: list[dict[str, Any]], turns: list[int], where: str):
        texts = [self._render(messages, False)]
        for i in turns:
            texts += [self._render(messages[:i], True), self._render(messages[: i + 1], False)]
        ids, *prefixes = self._ids(texts)
        mask = [0] * len(ids)
        for n, i in enumerate(turns):
            start, end = prefixes[2 * n], prefixes[2 * n + 1]
            self._check_prefix(start, ids, messages, i, where, True, texts[0], texts[1 + 2 * n])
            self._check_prefix(end, ids, messages, i + 1, where, False, texts[0], texts[2 + 2 * n])
            mask[len(start) : len(end)] = [1] * (len(end) - len(start))
        if not any(mask):
            raise DataError(
                f"{where}: the chat template renders the assistant turns {turns} as no tokens"
            )
        return ids, mask

    def _check_prefix(
        self,
        prefix: list[int],
        ids: list[int],
        messages: list[dict[str, Any]],
        k: int,
        where: str,
        generation_prompt: bool,
        full_text: str | None = None,
        prefix_text: str | None = None,
    ) -> None:
        if ids[: len(prefix)] == prefix:
            return
        part = f"messages[:{k}]" + (" with the generation prompt" if generation_prompt else "")
        if k == 0:
            part += " (the empty conversation before a first assistant turn)"
        if (
            full_text is not None
            and prefix_text is not None
            and not full_text.startswith(prefix_text)
        ):
            why = f"renders {part} differently when later turns follow (it is not prefix-stable)"
        else:
            why = f"tokenizes {part} differently from the start of the whole conversation"
        raise DataError(
            f"{where}: cannot locate the assistant tokens: the chat template {why}; use a "
            "template that renders each turn the same whatever follows, or mark the assistant "
            "text with {% generation %}...{% endgeneration %}"
        )


__all__ = [
    "FORMATS",
    "TRAIN_ON",
    "TRUNCATION",
    "DataError",
    "ExampleEncoder",
    "check_columns",
    "has_generation_markers",
    "require_chat_template",
    "resolve_format",
    "row_texts",
    "template_fields",
]
