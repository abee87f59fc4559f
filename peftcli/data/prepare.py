"""prepare_data: a recipe's data section -> the tokenized train and eval splits (and the label set),
loaded, checked and tokenized for the task; batching.py turns them into batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
from transformers import PreTrainedTokenizerBase

from peftcli.config.schema import DataSpec
from peftcli.data.columns import check_columns
from peftcli.data.labels import LABEL_SETS
from peftcli.data.loading import load_raw, load_trimmed, split_source
from peftcli.data.tokenize import TOKENIZE, tokenize_causal_lm, tokenize_seq2seq
from peftcli.errors import DataError
from peftcli.tasks.registry import IGNORE_INDEX, TASKS


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_names: list[str] | None = None  # id -> label, for classification
    dropped: dict[str, int] = field(default_factory=dict)


def prepare_data(spec: DataSpec, task: str, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    raw = load_raw(spec)
    for split, ds in raw.items():
        check_columns(ds, split, spec, task)
    train_raw = raw[spec.train_split]
    eval_raw = raw.get(spec.eval_split) if spec.eval_split else None
    if (key := TASKS[task].label_column) is not None:
        return prepare_labelled(spec, tokenizer, train_raw, eval_raw, key)
    if TASKS[task].encoder_decoder:
        train = tokenize_seq2seq(train_raw, spec, tokenizer, spec.train_split)
        ev = tokenize_seq2seq(eval_raw, spec, tokenizer, str(spec.eval_split)) if eval_raw is not None else None
        return PreparedData(train, ev)
    train = tokenize_causal_lm(train_raw, spec, tokenizer, spec.train_split)
    require_targets(train, len(train_raw), spec, spec.train_split, "train on")
    ev = tokenize_causal_lm(eval_raw, spec, tokenizer, str(spec.eval_split)) if eval_raw is not None else None
    if ev is not None and eval_raw is not None:
        require_targets(ev, len(eval_raw), spec, str(spec.eval_split), "evaluate")
    dropped = {spec.train_split: len(train_raw) - len(train)}
    return PreparedData(train, ev, None, dropped)


def require_targets(ds: datasets.Dataset, rows: int, spec: DataSpec, split: str, verb: str) -> None:
    """A split left without a single target once tokenized is an error: training would take no step,
    and an eval would report loss 0 and perplexity 1 (or accuracy 0) from nothing."""
    c = spec.columns
    if "num_words" in ds.column_names:  # token classification keeps every row; a word may be cut
        if any(t != IGNORE_INDEX for labels in ds["labels"] for t in labels):
            return
        raise DataError(
            f"data.columns.tokens: split {split!r} has no word within data.max_length {spec.max_length}, nothing to "
            f"{verb} (got {rows} rows). Give rows with words, or raise data.max_length."
        )
    if len(ds) > 0:
        return
    if c.messages:
        raise DataError(
            f"data.columns.messages: split {split!r} has no conversation with an assistant turn within its first "
            f"{spec.max_length} tokens, nothing to {verb} (got {rows} conversations). "
            "Check the roles (only assistant turns are trained and scored) or raise data.max_length."
        )
    if c.text:
        raise DataError(
            f"data.columns.text: split {split!r} has no example of two tokens or more within data.max_length "
            f"{spec.max_length}, nothing to {verb} (got {rows} examples). "
            "Give examples with text, or raise data.max_length."
        )
    trimmed = (
        f", or data.max_eval_examples (it keeps the first {spec.max_eval_examples})"
        if verb == "evaluate" and spec.max_eval_examples
        else ""
    )
    raise DataError(
        f"data.max_length: every prompt of split {split!r} fills all {spec.max_length} tokens, leaving no response "
        f"to {verb} (got {rows} examples). Raise data.max_length{trimmed}."
    )


def prepare_labelled(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_raw: datasets.Dataset,
    eval_raw: datasets.Dataset | None,
    key: str,
) -> PreparedData:
    """Classification, of rows (`label`) or of words (`tags`): the label set from the training split,
    then both splits tokenized with its ids."""
    names = LABEL_SETS[key](train_raw, getattr(spec.columns, key), split_source(spec, spec.train_split))
    if len(names) < 2:
        raise DataError(
            f"data.columns.{key}: the training split has a single {key.rstrip('s')} ({names}); "
            "classification needs two or more."
        )
    tokenize = TOKENIZE[key]
    train = tokenize(train_raw, spec, tokenizer, names, spec.train_split)
    require_targets(train, len(train_raw), spec, spec.train_split, "train on")
    ev = tokenize(eval_raw, spec, tokenizer, names, str(spec.eval_split)) if eval_raw is not None else None
    if ev is not None and eval_raw is not None:
        require_targets(ev, len(eval_raw), spec, str(spec.eval_split), "evaluate")
    return PreparedData(train, ev, names)


def prepare_eval_data(
    spec: DataSpec, task: str, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None
) -> datasets.Dataset:
    """Only the eval split, with the label ids the adapter was trained with."""
    split = str(spec.eval_split)
    ds = load_trimmed(spec, split, spec.max_eval_examples)
    check_columns(ds, split, spec, task)
    if (key := TASKS[task].label_column) is not None:
        assert label_names is not None
        data = TOKENIZE[key](
            ds,
            spec,
            tokenizer,
            label_names,
            split,
            f"the adapter's {key.rstrip('s')}s (adapter/labels.json, or --labels)",
        )
    elif TASKS[task].encoder_decoder:
        data = tokenize_seq2seq(ds, spec, tokenizer, split)
    else:
        data = tokenize_causal_lm(ds, spec, tokenizer, split)
    require_targets(data, len(ds), spec, split, "evaluate")
    return data
