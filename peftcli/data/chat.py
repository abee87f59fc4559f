"""Chat data: a conversation rendered with the tokenizer's own chat template, its tokens labelled so that
only the assistant's turns are trained.

A conversation is OpenAI's list of `{role, content}` messages or ShareGPT's `{from, value}` (human, gpt,
system). How the assistant's turns are found: the conversation is rendered in full, and again up to each
assistant message, without it (with the generation prompt) and with it. The text between the two is
the assistant's turn as the template writes it, its closing end-of-turn token included; the template is
asked only for what it renders anyway, so any template works. The alternative, a template's own
`{% generation %}` marks (apply_chat_template's return_assistant_tokens_mask), is missing from most
shipped templates (SmolLM2's, Llama 3's, Qwen's). The full text is tokenized once, as
apply_chat_template(tokenize=True) does, and a token is trained when its first character lies in an
assistant's turn: the ids are exactly the template's, and a token merged across the boundary of a turn
is never half-trained.
"""

from __future__ import annotations

from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from peftcli.errors import DataError, first_line
from peftcli.tasks.registry import IGNORE_INDEX

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TRAINED_ROLE = "assistant"


def require_chat_template(tokenizer: PreTrainedTokenizerBase, key: str, fix: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{key}: the tokenizer of {tokenizer.name_or_path!r} has no chat template. {fix}")


def as_messages(value: Any, where: str) -> list[dict[str, str]]:
    """One conversation, in either shape, as [{role, content}]. Other keys (name, tool calls) are dropped."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: expected a non-empty list of messages, {{role, content}} or {{from, value}} (got "
            f"{str(value)[:100]!r})."
        )
    messages = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and m.get("role") is not None:
            role, content = str(m["role"]), m.get("content")
        elif isinstance(m, dict) and m.get("from") is not None:
            role, content = SHAREGPT_ROLES.get(str(m["from"]), ""), m.get("value")
            if not role:
                raise DataError(
                    f"{where}, message {i}: unknown ShareGPT speaker (got from={m['from']!r}). "
                    "Use human, gpt or system."
                )
        else:
            keys = ", ".join(k for k, v in m.items() if v is not None) if isinstance(m, dict) else type(m).__name__
            raise DataError(
                f"{where}, message {i}: a message has role and content (OpenAI) or from and value (ShareGPT) (got "
                f"{keys})."
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}, message {i}: the content is not text (got {type(content).__name__}). Write it as a string."
            )
        messages.append({"role": role, "content": content})
    return messages


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str, generation_prompt: bool = False
) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        # Templates raise their own rules (roles must alternate, a system message first only, ...).
        first = first_line(exc, 200)
        raise DataError(
            f"{where}: the chat template refused this conversation ({first}). "
            "Fix the conversation to fit the model's template."
        ) from None


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != TRAINED_ROLE:
            continue
        through = render(tokenizer, messages[: i + 1], where)
        start = turn_start(tokenizer, messages[:i], through, where)
        if start is None or not full.startswith(through):
            raise DataError(
                f"{where}, message {i}: the chat template renders a conversation's earlier turns differently from "
                "its last one, so the assistant's turns cannot be told apart. "
                "Split the conversation at each assistant turn, "
                "or use prompt/response columns."
            )
        spans.append((start, len(through)))
    return full, spans


def turn_start(
    tokenizer: PreTrainedTokenizerBase, history: list[dict[str, str]], through: str, where: str
) -> int | None:
    """Where the assistant's message begins in `through`: after the generation prompt (the header a
    model sees at inference), or, for a template that writes that header differently, after the history."""
    if not history:  # a conversation that opens with the assistant: everything up to the end of its turn
        return 0
    for generation_prompt in (True, False):
        before = render(tokenizer, history, where, generation_prompt)
        if through.startswith(before):
            return len(before)
    return None


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """input_ids and labels of one conversation: labels are the ids in assistant turns, IGNORE_INDEX elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(a <= first < b for a, b in spans) else IGNORE_INDEX
        for t, (first, _) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def require_fast(tokenizer: PreTrainedTokenizerBase, key: str) -> None:
    # Token offsets into the rendered text come from the Rust tokenizers only.
    if not tokenizer.is_fast:
        raise DataError(
            f"{key}: chat data needs a fast tokenizer (tokenizer.json) to find the assistant's tokens (got "
            f"{type(tokenizer).__name__}). Use the model's fast tokenizer."
        )
