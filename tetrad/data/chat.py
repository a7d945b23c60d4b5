"""Conversations → token ids plus a per-token target mask, rendered as transformers renders them.

The text is what ``apply_chat_template`` gives for the whole conversation (transformers' own Jinja
machinery, with the tokenizer's template and special tokens), tokenized in one piece, so the ids
are those ``apply_chat_template(..., tokenize=True)`` returns. Which tokens the assistant wrote is
found by rendering prefixes: assistant turn i starts where the conversation up to turn i with the
generation prompt ends, and ends where the conversation up to and including it ends. Templates
that render the last assistant turn unlike earlier ones (Qwen3's empty think block) fall back to
locating the message's content and the end-of-turn text the template put after it.
"""

from __future__ import annotations

import bisect
import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import tokenizers

from tetrad.config.job_config import DataConfig
from tetrad.data.tokenizer import Tokenizer
from tetrad.errors import ConfigError, DataError

CHAT_COLUMNS = (("messages",), ("prompt", "completion"))
"""The columns of a chat record: `messages` (optional `system`), or `prompt` and `completion`."""

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
"""Templates for tokenizers without one of their own (tetrad's default among them)."""


def encoder_template(data: DataConfig, tokenizer: Tokenizer) -> str:
    """The template --data.chat_template picks: a built-in by name; auto = the tokenizer's own,
    else ChatML."""
    return BUILTIN_TEMPLATES.get(data.chat_template) or tokenizer.chat_template or CHATML


def chat_template_for(data: DataConfig, tokenizer: Tokenizer) -> str | None:
    """The template a run's Hugging Face exports carry: the one it rendered conversations with
    under --data.format chat, else the tokenizer's own (None when it has none)."""
    return encoder_template(data, tokenizer) if data.format == "chat" else tokenizer.chat_template


def conversation(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A record's messages: its `messages` (after its top-level `system`, if any), or its
    `prompt`/`completion` as a user and an assistant message."""
    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    messages = record.get("messages")
    if messages is not None:
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise DataError(f"chat record: 'messages' must be a non-empty list, got {messages!r}")
        for message in messages:
            if not (
                isinstance(message, Mapping)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"chat record: every message needs string 'role' and 'content', got {message!r}"
                )
        return head + [dict(m) for m in messages]  # other keys too, as transformers passes them
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [
            *head,
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
    raise DataError(
        "chat record has neither 'messages' ([{role, content}, ...], optional 'system') nor "
        f"'prompt' and 'completion' strings; its fields: {sorted(record)}"
    )


def _hf_tokenizer(tokenizer: Tokenizer, template: str) -> Any:
    """transformers' tokenizer over the same `tokenizers` model: its apply_chat_template is the
    reference rendering (the template sees the special tokens, as in transformers)."""
    try:
        transformers: ModuleType = importlib.import_module("transformers")
    except ImportError as err:
        raise ConfigError(
            "--data.format chat renders chat templates with transformers: pip install 'tetrad[hf]'"
        ) from err
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())  # theirs may change it
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=template, **tokenizer.special_tokens
    )


class ChatEncoder:
    """One conversation → (token ids, is_target per token), or None when dropped as overlong.
    Conversations are packed whole (``whole_documents``), never cut across windows."""

    whole_documents = True

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        *,
        max_tokens: int,
        train_on_prompt: bool = False,
        overlong: str = "truncate",
    ) -> None:
        self._tokenizer = tokenizer
        self._hf = _hf_tokenizer(tokenizer, template)
        self.max_tokens = max_tokens
        self.train_on_prompt = train_on_prompt
        self.overlong = overlong
        self.dropped = 0
        """Conversations skipped: overlong under "drop", or truncated to no assistant token."""
        self.truncated = 0
        """Conversations cut to max_tokens."""

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool = False) -> str:
        """The template's text for `messages`, exactly as transformers renders it."""
        try:
            text = self._hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja raises many types, and templates raise their own
            reason = " ".join(str(err).split())[:200]
            raise DataError(f"the chat template cannot render a conversation: {reason}") from err
        return str(text)

    def assistant_spans(self, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
        """[start, end) characters of each assistant turn in `text`, the whole rendering."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation_prompt=True) if i else ""
            if not text.startswith(prompt):
                raise DataError(
                    f"the chat template renders the prompt of assistant message {i} differently "
                    "from the whole conversation; its tokens cannot be told apart"
                )
            start, upto = len(prompt), self.render(messages[: i + 1])
            if text.startswith(upto):
                spans.append((start, len(upto)))
                continue
            # The template renders this turn unlike when it is the last one: find its content,
            # then the end-of-turn text the template puts after it.
            content = message["content"].strip()
            found = text.find(content, start)
            if not content or found < 0 or upto.rfind(content) < 0:
                raise DataError(
                    f"the chat template changes the text of assistant message {i}; its tokens "
                    "cannot be located in the rendered conversation"
                )
            end = found + len(content)
            tail = upto[upto.rfind(content) + len(content) :]
            spans.append((start, end + len(tail) if text.startswith(tail, end) else end))
        return spans

    def encode(self, record: Mapping[str, Any]) -> tuple[list[int], list[bool]] | None:
        """One conversation → (token ids, is_target per token, same length), or None when the
        record is dropped by the overlong policy. is_target is True exactly for assistant output
        tokens (with the turn's end-of-turn text), all True but the first with train_on_prompt.
        """
        messages = conversation(record)
        text = self.render(messages)
        ids, offsets = self._tokenizer.encode_with_offsets(text)
        if self.train_on_prompt:
            is_target = [i > 0 for i in range(len(ids))]
        else:
            spans = self.assistant_spans(messages, text)
            starts = [s for s, _ in spans]
            is_target = []
            for begin, _ in offsets:  # a token belongs to the span its first character is in
                k = bisect.bisect_right(starts, begin) - 1
                is_target.append(k >= 0 and begin < spans[k][1])
        if len(ids) <= self.max_tokens:
            return ids, is_target
        if self.overlong == "drop":
            self.dropped += 1
            return None
        ids, is_target = ids[: self.max_tokens], is_target[: self.max_tokens]
        if not any(is_target):
            self.dropped += 1
            return None
        self.truncated += 1
        return ids, is_target

    def encode_rows(
        self, rows: Sequence[Mapping[str, Any]]
    ) -> list[tuple[list[int], list[bool] | None] | None]:
        """``encode`` per row: the loader's ``DocumentEncoder`` interface."""
        return [self.encode(row) for row in rows]


def build_chat_encoder(data: DataConfig, tokenizer: Tokenizer, *, max_tokens: int) -> ChatEncoder:
    """The encoder for --data.format chat: template, masking and overlong policy from `data`;
    max_tokens = seq_len + 1 (a window's inputs and labels)."""
    return ChatEncoder(
        tokenizer,
        encoder_template(data, tokenizer),
        max_tokens=max_tokens,
        train_on_prompt=data.train_on_prompt,
        overlong=data.overlong,
    )
