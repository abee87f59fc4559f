"""build_data: load a dataset (hub id or local files), map its columns, tokenize, and batch it with
dynamic padding and length-grouped batches.

On SST-2, random batches padded to their longest example spend about 60% of the compute on padding;
grouping examples of similar length (random across groups) removes most of it.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from peftcli.config.recipe import DataSpec, is_hub_id
from peftcli.data import hub
from peftcli.data.chat import as_messages, encode_chat, require_chat_template, require_fast
from peftcli.errors import DataError, first_line
from peftcli.tasks.registry import IGNORE_INDEX, TASKS

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAVE_AS_UTF8 = "Save the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)."


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_names: list[str] | None = None  # id -> label, for classification
    dropped: dict[str, int] = field(default_factory=dict)


# -- loading ------------------------------------------------------------------------------------


def load_raw(spec: DataSpec) -> dict[str, datasets.Dataset]:
    """The train and eval splits as HF datasets, trimmed to max_*_examples."""
    splits = {spec.train_split: load_trimmed(spec, spec.train_split, spec.max_train_examples)}
    if spec.eval_split and spec.eval_split not in splits:
        splits[spec.eval_split] = load_trimmed(spec, spec.eval_split, spec.max_eval_examples)
    return splits


def load_trimmed(spec: DataSpec, split: str, limit: int | None) -> datasets.Dataset:
    ds = _load_split(spec, split)
    if len(ds) == 0:
        raise DataError(f"data: split {split!r} is empty. Give a file or split with examples.")
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def dataset_revision(spec: DataSpec) -> str | None:
    """What to load a hub dataset at: the commit data.revision (or the default branch) points to,
    resolved once a process (hub.py), so every split comes from one commit; None for a local folder."""
    name = str(spec.dataset)
    if not is_hub_id(name):
        return None
    offline = datasets.config.HF_HUB_OFFLINE  # HF_DATASETS_OFFLINE or HF_HUB_OFFLINE
    return hub.resolve_commit(name, "dataset", spec.revision, "data.dataset", offline, DataError) or spec.revision


def data_commit(spec: DataSpec) -> str | None:
    """The commit of the hub dataset this process loaded, for report.json; None for local files."""
    return hub.known_commit(spec.dataset, "dataset", spec.revision) if spec.files is None else None


def _load_split(spec: DataSpec, split: str) -> datasets.Dataset:
    if spec.files is not None:
        return _load_files(spec.files[split], split)
    revision = dataset_revision(spec)
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(spec.dataset, spec.subset, split=split, revision=revision)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        if refused := hub.refusal_line(exc, str(spec.dataset), "dataset", spec.revision, "data.dataset"):
            raise DataError(refused) from None
        first = first_line(exc, 300)
        raise DataError(
            f"data: cannot load split {split!r} from {spec.dataset}: {first}. Check the dataset id, split and files."
        ) from None
    except Exception as exc:  # noqa: BLE001 - pyarrow/csv parse errors have many types; name the file and the cause
        if isinstance(exc.__cause__, UnicodeDecodeError) and (where := first_non_utf8(_text_files(spec))):
            raise DataError(f"data.dataset: {where}. {SAVE_AS_UTF8}") from None
        detail = str(exc).strip().splitlines()[0][:300].rstrip(".") if str(exc).strip() else ""
        raise DataError(
            f"data: cannot read split {split!r} from {spec.dataset}: {type(exc).__name__}: {detail}. "
            "Check the dataset id and your connection, or point data.dataset / data.files at local files."
        ) from None
    require_utf8(ds, _text_files(spec), "data.dataset")
    return ds


def _load_files(files: list[str], split: str) -> datasets.Dataset:
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown or len({BUILDERS[s] for s in suffixes}) != 1 or suffixes == {".csv", ".tsv"}:
        raise DataError(
            f"data.files.{split}: cannot tell the format of {files} (use one of "
            f"{', '.join(BUILDERS)} for all files of a split)."
        )
    suffix = suffixes.pop()
    kwargs = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(BUILDERS[suffix], data_files=files, split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - pyarrow/csv parse errors have many types; name the file and the cause
        # datasets wraps a parse error in a DatasetGenerationError whose own message says nothing.
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        if isinstance(cause, UnicodeDecodeError) and (where := first_non_utf8([Path(f) for f in files])):
            raise DataError(f"data.files.{split}: {where}. {SAVE_AS_UTF8}") from None
        detail = str(cause).strip().splitlines()[0][:300].rstrip(".") if str(cause).strip() else ""
        raise DataError(
            f"data.files.{split}: cannot read {files} as {suffix.lstrip('.')} ({type(cause).__name__}: {detail}). "
            f"Check that it is valid {suffix.lstrip('.')}."
        ) from None
    require_utf8(ds, [Path(f) for f in files], f"data.files.{split}")
    return ds


def require_utf8(ds: datasets.Dataset, paths: list[Path], key: str) -> None:
    """The json reader copies a string's bytes without decoding them: a Latin-1 file loads, and fails
    with a UnicodeDecodeError wherever its text is first read. Arrow's full validation checks every
    string is UTF-8 (a pass over the bytes, in C++). Local text files only: a hub dataset was converted
    by its own builder."""
    if not any(p.suffix.lower() in (".json", ".jsonl") for p in paths):
        return
    try:
        ds.data.validate(full=True)
    except pyarrow.ArrowInvalid:
        if where := first_non_utf8(paths):
            raise DataError(f"{key}: {where}. {SAVE_AS_UTF8}") from None


def _text_files(spec: DataSpec) -> list[Path]:
    """The text files of a local dataset folder (none for a hub dataset)."""
    folder = Path(str(spec.dataset))
    return (
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".txt"))
        if folder.is_dir()
        else []
    )


def first_non_utf8(paths: list[Path]) -> str | None:
    """Where the first byte that is not UTF-8 is, as `<file>: line N: not UTF-8 text (got ...)`; None
    if every file decodes. Line by line: a newline byte never occurs inside a UTF-8 character."""
    for path in paths:
        offset = 0
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{path}: line {number}: not UTF-8 text (got byte 0x{line[exc.start]:02x} at byte offset {offset + exc.start})"
                offset += len(line)
    return None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a load failure at error level before raising it; the DataError reports it once."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _require_columns(ds: datasets.Dataset, split: str, wanted: dict[str, str | None]) -> None:
    for key, column in wanted.items():
        if column is not None and column not in ds.column_names:
            raise DataError(
                f"data.columns.{key}: column {column!r} is not in split {split!r} "
                f"(columns: {', '.join(ds.column_names)}). Set data.columns.{key} to one of them."
            )


def _source(spec: DataSpec, split: str) -> str:
    """The file(s) or dataset a split is read from, for error messages."""
    if spec.files is not None:
        files = spec.files.get(split, [])
        return files[0] if len(files) == 1 else str(files)
    return f"{spec.dataset} split {split!r}"


# -- classification -----------------------------------------------------------------------------


def class_key(value: Any, key: str, where: str) -> str:
    """A label (or tag) as the name of its class: an integer as its digits (bools and whole floats
    too: a CSV label column with a blank cell is read as floats, 1.0), a string as it is. Anything
    else is refused, not turned into a class of its own by str() ("None", "nan", "0.5", "[1]")."""
    what, unit = ("label", "row") if key == "label" else ("tag", "word")
    if (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    ):
        shown = "null" if value is None else "NaN" if isinstance(value, float) else repr(value)
        raise DataError(
            f"data.columns.{key}: {where}: the {what} is missing (got {shown}). Give every {unit} a {what}, or remove the rows without one."
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (bool, int)):
        return str(int(value))
    if isinstance(value, str):
        return value
    raise DataError(
        f"data.columns.{key}: {where}: a {what} is one string or one integer 0..N-1 per {unit} (got {_shown(value)}). "
        f"Map the values to class names or ids; {'regression and multi-label classification are' if key == 'label' else 'nested tags are'} not supported."
    )


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def class_names(keyed: list[tuple[Any, str, str]], key: str, source: str) -> list[str]:
    """The classes of (value, class key, where) triples: 0..N-1 when every value is a number, else the
    strings, sorted. Numbers and strings mixed in one split are refused: 1, True and "1" would be one
    class, and "neg" another, whatever the data meant."""
    numbers = [k for v, k, _ in keyed if _is_number(v)]
    if numbers and len(numbers) < len(keyed):
        number, _, number_at = next(x for x in keyed if _is_number(x[0]))
        text, _, text_at = next(x for x in keyed if not _is_number(x[0]))
        what = "labels" if key == "label" else "tags"
        raise DataError(
            f"data.columns.{key}: {source}: {what} mix numbers and strings (got {number!r} at {number_at}, {text!r} at {text_at}). "
            f"Write every {what[:-1]} as a string, or every {what[:-1]} as an integer 0..N-1."
        )
    if numbers:
        ids = {int(k) for k in numbers}
        if min(ids) < 0:
            raise DataError(
                f"data.columns.{key}: integer {'labels' if key == 'label' else 'tags'} must be 0..N-1 (got {min(ids)})."
            )
        return [str(i) for i in range(max(ids) + 1)]
    return sorted({k for _, k, _ in keyed})


def label_names_for(ds: datasets.Dataset, column: str, source: str = "the training split") -> list[str]:
    """The label set of a split: a ClassLabel's names, 0..N-1 for integer labels, else the strings
    found, sorted. `source` (the file) names where a bad label is."""
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    keyed = [(v, class_key(v, "label", f"{source}: row {i + 1}"), f"row {i + 1}") for i, v in enumerate(ds[column])]
    return class_names(keyed, "label", source)


def class_label_names(values: list[Any], feature: Any, key: str, where: list[str]) -> list[Any]:
    """A ClassLabel column (hub datasets: SST-2's label, conll2003's tags) holds class ids, and its names
    are the label set (label_names_for, tag_names_for): its ids as those names. -1 is how datasets
    marks a row without a label (SST-2's test split)."""
    if not isinstance(feature, datasets.ClassLabel):
        return values
    names = []
    for value, at in zip(values, where):
        if value == -1:
            raise DataError(
                f"data.columns.{key}: {at}: no label: the ClassLabel column marks an unlabelled row with -1, as SST-2's test split does (got -1). Train and evaluate on labelled splits."
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < feature.num_classes:
            raise DataError(
                f"data.columns.{key}: {at}: not a class id of the ClassLabel column ({', '.join(feature.names)}) (got {value!r}). Fix the data."
            )
        names.append(feature.names[value])
    return names


def _label_ids(values: list[Any], label_names: list[str], split: str, known_from: str, where: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for v, at in zip(values, where):
        key = class_key(v, "label", at)
        if key not in index:
            raise DataError(
                f"data.columns.label: label {v!r} in split {split!r} is not one of {known_from} "
                f"({', '.join(label_names)}). Fix the data or the label column."
            )
        ids.append(index[key])
    return ids


def texts(rows: dict[str, list[Any]], column: str, key: str, where: list[str]) -> list[str]:
    """A text column's values as strings (numbers are written out); a missing or nested value is
    refused, not tokenized as "None" or "['a', 'b']"."""
    out = []
    for value, at in zip(rows[column], where):
        if value is None or isinstance(value, (list, dict)) or (isinstance(value, float) and math.isnan(value)):
            got = "null" if value is None else "NaN" if isinstance(value, float) else _shown(value)
            raise DataError(
                f"data.columns.{key}: {at}: expected text in column {column!r} (got {got}). Fill it in, or remove the row."
            )
        out.append(str(value))
    return out


def tokenize_classification(
    ds: datasets.Dataset,
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str],
    split: str,
    known_from: str = "the training split's labels",
) -> datasets.Dataset:
    c = spec.columns
    source = _source(spec, split)

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        where = [f"{source}: row {i + 1}" for i in indices]
        pair = texts(rows, c.text_pair, "text_pair", where) if c.text_pair else None
        enc = tokenizer(texts(rows, str(c.text), "text", where), pair, truncation=True, max_length=spec.max_length)
        values = class_label_names(rows[c.label], ds.features[c.label], "label", where)
        enc["labels"] = _label_ids(values, label_names, split, known_from, where)
        return enc

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")


# -- token classification ----------------------------------------------------------------------


def tag_names_for(ds: datasets.Dataset, column: str, source: str = "the training split") -> list[str]:
    """The tag set of a split: a ClassLabel's names (hub datasets such as conll2003), 0..N-1 for plain
    ints, else the strings found (with B-X and I-X for every type X), sorted with O first and each
    type's B- before its I-, so the ids do not depend on the order the data happens to be in."""
    inner = getattr(ds.features[column], "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    keyed = [
        (v, class_key(v, "tags", f"{source}: row {i + 1}, word {k + 1}"), f"row {i + 1}")
        for i, row in enumerate(ds[column])
        if isinstance(row, list)
        for k, v in enumerate(row)
    ]
    names = class_names(keyed, "tags", source)
    if keyed and _is_number(keyed[0][0]):
        return names

    def order(tag: str) -> tuple[int, str, str]:
        prefix, dash, kind = tag.partition("-")
        return (0, "", "") if tag == "O" else (1, kind, prefix) if dash else (1, tag, "")

    tags = set(names)
    # Each entity type gets both its B- and I- tag even where the training split lacks one (one-word
    # entities only, say): another split or a prediction may hold it, and the set stays the same.
    tags |= {f"{p}-{t[2:]}" for t in tags if t[:2] in ("B-", "I-") for p in ("B", "I")}
    return sorted(tags, key=order)


def _word_rows(
    rows: dict[str, list[Any]], c: Any, spec: DataSpec, split: str, indices: list[int]
) -> list[tuple[list[str], list[Any]]]:
    """Each row's words and tags, checked: two lists of the same length."""
    out = []
    for words, tags, index in zip(rows[c.tokens], rows[c.tags], indices):
        where = f"{_source(spec, split)}: row {index + 1}"
        if not isinstance(words, list) or not isinstance(tags, list):
            bad, value = ("tokens", words) if not isinstance(words, list) else ("tags", tags)
            raise DataError(
                f'data.columns.{bad}: {where}: expected a list, one entry per word (got {str(value)[:80]!r}). Write the row as {{"tokens": [...], "tags": [...]}}.'
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
            f"data.columns.tokens: aligning tags to sub-tokens needs a fast tokenizer (tokenizer.json) (got {type(tokenizer).__name__}). Use the model's fast tokenizer."
        )
    c = spec.columns
    index = {name: i for i, name in enumerate(tag_names)}
    inner = getattr(ds.features[c.tags], "feature", None)

    def tag_id(tag: Any, where: str) -> int:
        key = class_key(class_label_names([tag], inner, "tags", [where])[0], "tags", where)
        if key not in index:
            raise DataError(
                f"data.columns.tags: {where}: tag {tag!r} is not one of {known_from} ({', '.join(tag_names)}). Fix the data or the tags column."
            )
        return index[key]

    def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        checked = _word_rows(rows, c, spec, split, indices)
        enc = tokenizer([w for w, _ in checked], is_split_into_words=True, truncation=True, max_length=spec.max_length)
        labels = []
        for i, ((_, tags), row) in enumerate(zip(checked, indices)):
            ids = [tag_id(t, f"{_source(spec, split)}: row {row + 1}, word {k + 1}") for k, t in enumerate(tags)]
            labels.append(word_labels(enc.word_ids(i), ids))
        enc["labels"] = labels
        enc["num_words"] = [len(w) for w, _ in checked]
        return enc

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")


def words_cut(ds: datasets.Dataset) -> int:
    """Words that max_length cut off (no labelled sub-token left): not trained, not scored."""
    labelled = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in ds["labels"])
    return sum(ds["num_words"]) - labelled


# By a task's data.columns key for its labels (Task.label_column): how the label set is read from the
# training split, and how rows are tokenized with the label ids.
LABEL_SETS = {"label": label_names_for, "tags": tag_names_for}
TOKENIZE = {"label": tokenize_classification, "tags": tokenize_tokens}


# -- causal LM ---------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise DataError(
            f"data.columns.prompt_template: {exc} (got {template!r}). Write columns as {{name}}, literal braces as {{{{ }}}}."
        ) from None


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
    fix = "Use a chat (instruct) model, save a chat template beside its tokenizer (chat_template.jinja), or train on prompt/response columns."
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

    source = _source(spec, split)

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


def require_texts(rows: dict[str, list[Any]], spec: DataSpec, where: list[str]) -> None:
    """The text columns a causal_lm or seq2seq_lm example is built from hold a value in every row: a
    null would be tokenized as the word "None"."""
    c = spec.columns
    for key in ("text", "prompt", "response"):
        column = getattr(c, key)
        if column is not None and not (key == "response" and c.response_names is not None):
            texts(rows, column, key, where)
    for name in _template_fields(c.prompt_template) if c.prompt_template else []:
        for value, at in zip(rows[name], where):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise DataError(
                    f"data.columns.prompt_template: {at}: column {name!r} has no value (got {'null' if value is None else 'NaN'}). Fill it in, or remove the row."
                )


def prompt_of(spec: DataSpec, rows: dict[str, list[Any]], i: int) -> str:
    """Row i's prompt: the prompt column, or the template filled from the row's columns."""
    c = spec.columns
    if c.prompt_template:
        return c.prompt_template.format_map({k: rows[k][i] for k in rows})
    return str(rows[c.prompt][i]) if c.prompt else ""


# -- sequence to sequence ----------------------------------------------------------------------


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
            f"is not an integer 0..{len(names) - 1}. Name every value, or remove response_names to train on the column's text."
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
    source = _source(spec, split)

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


# -- entry point -------------------------------------------------------------------------------


def check_columns(ds: datasets.Dataset, split: str, spec: DataSpec, task: str) -> None:
    c = spec.columns
    template_cols = _template_fields(c.prompt_template) if c.prompt_template else []
    wanted = {
        "text": c.text,
        "text_pair": c.text_pair,
        "prompt": c.prompt,
        "response": c.response,
        "messages": c.messages,
    }
    wanted |= {"label": c.label} if task == "sequence_classification" else {}
    wanted |= {"tokens": c.tokens, "tags": c.tags}
    wanted |= {f"prompt_template ({{{f}}})": f for f in template_cols}
    _require_columns(ds, split, wanted)


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
            f"data.columns.tokens: split {split!r} has no word within data.max_length {spec.max_length}, nothing to {verb} (got {rows} rows). Give rows with words, or raise data.max_length."
        )
    if len(ds) > 0:
        return
    if c.messages:
        raise DataError(
            f"data.columns.messages: split {split!r} has no conversation with an assistant turn within its first {spec.max_length} tokens, nothing to {verb} (got {rows} conversations). Check the roles (only assistant turns are trained and scored) or raise data.max_length."
        )
    if c.text:
        raise DataError(
            f"data.columns.text: split {split!r} has no example of two tokens or more within data.max_length {spec.max_length}, nothing to {verb} (got {rows} examples). Give examples with text, or raise data.max_length."
        )
    trimmed = (
        f", or data.max_eval_examples (it keeps the first {spec.max_eval_examples})"
        if verb == "evaluate" and spec.max_eval_examples
        else ""
    )
    raise DataError(
        f"data.max_length: every prompt of split {split!r} fills all {spec.max_length} tokens, leaving no response to {verb} (got {rows} examples). Raise data.max_length{trimmed}."
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
    names = LABEL_SETS[key](train_raw, getattr(spec.columns, key), _source(spec, spec.train_split))
    if len(names) < 2:
        raise DataError(
            f"data.columns.{key}: the training split has a single {key.rstrip('s')} ({names}); classification needs two or more."
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


# -- batching ----------------------------------------------------------------------------------


class GroupedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices. Every `grad_accum` consecutive micro-batches form one optimizer step's
    batch of `batch_size * grad_accum` examples, so the accumulated batch is the same whatever the
    split into micro-batches. With grouping, each step's batch holds examples of similar length
    (sorted within chunks of 50 steps' worth), and the order of steps is random but for the first,
    which holds the longest example."""

    MEGABATCH_STEPS = 50

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        grad_accum: int,
        group_by_length: bool,
        seed: int,
        num_processes: int = 1,
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        # accelerate deals micro-batches out to the processes in turn, so one optimizer step takes
        # grad_accum x num_processes consecutive micro-batches: the step's batch is the same as one
        # process accumulating that many.
        self.grad_accum = grad_accum * num_processes
        self.group_by_length = group_by_length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def step_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.grad_accum
        if self.group_by_length:
            mega = size * self.MEGABATCH_STEPS
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        steps = [order[s : s + size] for s in range(0, len(order), size)]
        if self.group_by_length and len(steps) > 1:
            # Shuffle whole steps, keeping a short last step at the end so steps stay aligned.
            full, last = (steps, []) if len(steps[-1]) == size else (steps[:-1], [steps[-1]])
            perm = torch.randperm(len(full), generator=g).tolist()
            full = [full[i] for i in perm]
            # The step with the longest example goes first, as in HF's length-grouped sampler: an
            # out-of-memory shows at step 1, and the allocator reaches its high-water mark at once
            # (grown by later, longer batches, glibc's heap peaked 11% higher on MiniLM SST-2).
            longest = max(range(len(full)), key=lambda k: max(self.lengths[i] for i in full[k]))
            full[0], full[longest] = full[longest], full[0]
            steps = full + last
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.step_batches():
            for s in range(0, len(step), self.batch_size):
                yield step[s : s + self.batch_size]

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size * self.grad_accum
        full, rest = divmod(n, size)
        return full * self.grad_accum + -(-rest // self.batch_size)


class Collator:
    """Pads a list of tokenized rows to the longest row (dynamic padding), on the right."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        batch["input_ids"] = self._pad([r["input_ids"] for r in rows], width, self.pad_token_id)
        batch["attention_mask"] = self._pad([[1] * len(r["input_ids"]) for r in rows], width, 0)
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = self._pad([r["token_type_ids"] for r in rows], width, 0)
        labels = [r["labels"] for r in rows]
        if isinstance(labels[0], list):
            # A seq2seq target has its own length; a causal LM's labels are as long as its input.
            batch["labels"] = self._pad(labels, max(len(x) for x in labels), IGNORE_INDEX)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    @staticmethod
    def _pad(seqs: list[list[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out


def lengths_of(ds: datasets.Dataset) -> list[int]:
    return [len(ids) for ids in ds["input_ids"]]


def train_loader(
    ds: datasets.Dataset,
    pad_token_id: int,
    batch_size: int,
    grad_accum: int,
    group_by_length: bool,
    seed: int,
    num_processes: int = 1,
) -> DataLoader:
    """All processes' micro-batches; accelerate's prepare() gives each process its own."""
    sampler = GroupedBatchSampler(lengths_of(ds), batch_size, grad_accum, group_by_length, seed, num_processes)
    return DataLoader(
        ds.with_format(None),
        batch_sampler=sampler,
        collate_fn=Collator(pad_token_id),
        generator=own_generator(seed),
        pin_memory=torch.cuda.is_available(),  # the copy to the GPU then does not block the host
    )


def own_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a seed from the global generator each time it is iterated, unless it has
    its own: with one, evals and resumed runs leave the global generator (dropout) untouched."""
    return torch.Generator().manual_seed(seed)


def eval_loader(
    ds: datasets.Dataset, pad_token_id: int, batch_size: int, process_index: int = 0, num_processes: int = 1
) -> DataLoader:
    """Longest examples first, in fixed batches: little padding, and an out-of-memory shows at once.
    With several processes, this process's share of the batches: every example exactly once overall."""
    lengths = lengths_of(ds)
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)][process_index::num_processes]
    return DataLoader(
        ds.with_format(None),
        batch_sampler=batches,
        collate_fn=Collator(pad_token_id),
        generator=own_generator(0),
        pin_memory=torch.cuda.is_available(),
    )
