"""Tokenizing a split per task: classification rows with label ids, words with tags on their first
sub-token, causal LM text or chat (prompt tokens masked), and seq2seq sources with their targets."""

from __future__ import annotations

from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from peftcli.config.schema import DataSpec
from peftcli.data.chat import as_messages, encode_chat, require_chat_template, require_fast
from peftcli.data.columns import prompt_of, require_texts, texts
from peftcli.data.labels import class_key, class_label_names, label_ids
from peftcli.data.loading import split_source
from peftcli.errors import DataError
from peftcli.tasks.registry import IGNORE_INDEX


def tokenize_classification(
    ds: datasets.Dataset,
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str],
    split: str,
    known_from: str = "the training split's labels",
) -> datasets.Dataset:
    c = spec.columns
    source = split_source(spec, split)

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        where = [f"{source}: row {i + 1}" for i in indices]
        pair = texts(rows, c.text_pair, "text_pair", where) if c.text_pair else None
        enc = tokenizer(texts(rows, str(c.text), "text", where), pair, truncation=True, max_length=spec.max_length)
        values = class_label_names(rows[c.label], ds.features[c.label], "label", where)
        enc["labels"] = label_ids(values, label_names, split, known_from, where)
        return enc

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")


def _word_rows(
    rows: dict[str, list[Any]], c: Any, spec: DataSpec, split: str, indices: list[int]
) -> list[tuple[list[str], list[Any]]]:
    """Each row's words and tags, checked: two lists of the same length."""
    out = []
    for words, tags, index in zip(rows[c.tokens], rows[c.tags], indices):
        where = f"{split_source(spec, split)}: row {index + 1}"
        if not isinstance(words, list) or not isinstance(tags, list):
            bad, value = ("tokens", words) if not isinstance(words, list) else ("tags", tags)
            raise DataError(
                f"data.columns.{bad}: {where}: expected a list, one entry per word (got {str(value)[:80]!r}). "
                'Write the row as {"tokens": [...], "tags": [...]}.'
            )
        if len(words) != len(tags):
            raise DataError(
                f"data.columns.tags: {where}: {len(words)} tokens but {len(tags)} tags. Give exactly one tag per word."
            )
        out.append(
            (texts({c.tokens: words}, c.tokens, "tokens", [f"{where}, word {k + 1}" for k in range(len(words))]), tags)
        )
    return out


def word_labels(word_ids: list[int | None], tag_ids: list[int]) -> list[int]:
    """One label per sub-token: the word's tag on its first sub-token, IGNORE_INDEX on the others and on
    special tokens (HF's convention: each word is scored once, by its first piece)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else tag_ids[word])
        previous = word
    return labels


def tokenize_tokens(
    ds: datasets.Dataset,
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    tag_names: list[str],
    split: str,
    known_from: str = "the training split's tags",
) -> datasets.Dataset:
    """Words -> sub-tokens with is_split_into_words; words past max_length are cut (and not scored:
    `num_words` keeps each row's word count, so the dry run and eval can say how many were)."""
    if not tokenizer.is_fast:  # word_ids() comes from the Rust tokenizers only
        raise DataError(
            "data.columns.tokens: aligning tags to sub-tokens needs a fast tokenizer (tokenizer.json) (got "
            f"{type(tokenizer).__name__}). Use the model's fast tokenizer."
        )
    c = spec.columns
    index = {name: i for i, name in enumerate(tag_names)}
    inner = getattr(ds.features[c.tags], "feature", None)

    def tag_id(tag: Any, where: str) -> int:
        key = class_key(class_label_names([tag], inner, "tags", [where])[0], "tags", where)
        if key not in index:
            raise DataError(
                f"data.columns.tags: {where}: tag {tag!r} is not one of {known_from} ({', '.join(tag_names)}). "
                "Fix the data or the tags column."
            )
        return index[key]

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        checked = _word_rows(rows, c, spec, split, indices)
        enc = tokenizer([w for w, _ in checked], is_split_into_words=True, truncation=True, max_length=spec.max_length)
        labels = []
        for i, ((_, tags), row) in enumerate(zip(checked, indices)):
            ids = [tag_id(t, f"{split_source(spec, split)}: row {row + 1}, word {k + 1}") for k, t in enumerate(tags)]
            labels.append(word_labels(enc.word_ids(i), ids))
        enc["labels"] = labels
        enc["num_words"] = [len(w) for w, _ in checked]
        return enc

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")


def words_cut(ds: datasets.Dataset) -> int:
    """Words that max_length cut off (no labelled sub-token left): not trained, not scored."""
    labelled = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in ds["labels"])
    return sum(ds["num_words"]) - labelled


# By a task's data.columns key for its labels (Task.label_column): how rows are tokenized with the
# label ids.
TOKENIZE = {"label": tokenize_classification, "tags": tokenize_tokens}


def tokenize_causal_lm(
    ds: datasets.Dataset, spec: DataSpec, tokenizer: PreTrainedTokenizerBase, split: str
) -> datasets.Dataset:
    encoded = (
        tokenize_chat(ds, spec, tokenizer, split)
        if spec.columns.messages
        else tokenize_columns(ds, spec, tokenizer, split)
    )
    # A prompt that fills max_length (or a conversation without an assistant turn) leaves nothing to
    # learn from; drop such rows (counted in the report).
    return encoded.filter(
        lambda row: any(t != IGNORE_INDEX for t in row["labels"][1:]), desc="dropping rows with no target"
    )


def tokenize_chat(
    ds: datasets.Dataset, spec: DataSpec, tokenizer: PreTrainedTokenizerBase, split: str
) -> datasets.Dataset:
    key = "data.columns.messages"
    fix = (
        "Use a chat (instruct) model, save a chat template beside its tokenizer (chat_template.jinja), or train on "
        "prompt/response columns."
    )
    require_chat_template(tokenizer, key, fix)
    require_fast(tokenizer, key)
    column = str(spec.columns.messages)

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for value, index in zip(rows[column], indices):
            where = f"{key}: row {index} of split {split!r}"
            ids, labels = encode_chat(tokenizer, as_messages(value, where), where)
            out["input_ids"].append(ids[: spec.max_length])
            out["labels"].append(labels[: spec.max_length])
        return out

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")


def tokenize_columns(
    ds: datasets.Dataset, spec: DataSpec, tokenizer: PreTrainedTokenizerBase, split: str
) -> datasets.Dataset:
    """Plain text (every token trained), or a prompt (masked) and a response (trained, EOS appended)."""
    c = spec.columns
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("model: the tokenizer has no end-of-sequence token, which causal_lm training appends.")

    source = split_source(spec, split)

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        require_texts(rows, spec, [f"{source}: row {i + 1}" for i in indices])
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for i in range(len(indices)):
            if c.text:
                ids = tokenizer(str(rows[c.text][i]), add_special_tokens=True)["input_ids"] + [eos]
                labels = list(ids)
            else:
                prompt = tokenizer(prompt_of(spec, rows, i), add_special_tokens=True)["input_ids"]
                response = tokenizer(str(rows[c.response][i]), add_special_tokens=False)["input_ids"] + [eos]
                ids = prompt + response
                labels = [IGNORE_INDEX] * len(prompt) + response
            out["input_ids"].append(ids[: spec.max_length])
            out["labels"].append(labels[: spec.max_length])
        return out

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")


def target_end_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a target: EOS, or [SEP] for BERT-style tokenizers, which have no EOS."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise DataError(
            "model: the tokenizer has neither an end-of-sequence nor a [SEP] token, which ends every seq2seq_lm target."
        )
    return int(end)


def target_text(spec: DataSpec, value: Any, split: str) -> str:
    """The response column's value, or with response_names the name of its integer value."""
    names = spec.columns.response_names
    if names is None:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
        raise DataError(
            f"data.columns.response_names: value {value!r} in split {split!r} of column {spec.columns.response!r} "
            f"is not an integer 0..{len(names) - 1}. Name every value, or remove response_names to train on the "
            "column's text."
        )
    return names[value]


def tokenize_seq2seq(
    ds: datasets.Dataset, spec: DataSpec, tokenizer: PreTrainedTokenizerBase, split: str
) -> datasets.Dataset:
    """The source (with the tokenizer's special tokens, cut to max_length) is the encoder's input; the
    target's tokens and the end token (cut to max_target_length) are the labels, from which the model
    builds the decoder's input."""
    end = target_end_id(tokenizer)
    response = str(spec.columns.response)
    source = split_source(spec, split)

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        require_texts(rows, spec, [f"{source}: row {i + 1}" for i in indices])
        sources = [prompt_of(spec, rows, i) for i in range(len(indices))]
        enc = tokenizer(sources, truncation=True, max_length=spec.max_length)
        targets = tokenizer([target_text(spec, t, split) for t in rows[response]], add_special_tokens=False)[
            "input_ids"
        ]
        labels = [(t[: spec.max_target_length - 1] + [end]) for t in targets]
        return {"input_ids": enc["input_ids"], "labels": labels}

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")
