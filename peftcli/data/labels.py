"""The classes of a split: label names of rows (`label`) or tag names of words (`tags`), from a
ClassLabel feature, integer ids 0..N-1 or the strings found, and each value mapped to its class."""

from __future__ import annotations

import math
from typing import Any

import datasets

from peftcli.data.columns import short_repr
from peftcli.errors import DataError


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
            f"data.columns.{key}: {where}: the {what} is missing (got {shown}). "
            f"Give every {unit} a {what}, or remove the rows without one."
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (bool, int)):
        return str(int(value))
    if isinstance(value, str):
        return value
    raise DataError(
        f"data.columns.{key}: {where}: a {what} is one string or one integer 0..N-1 per {unit} (got "
        f"{short_repr(value)}). Map the values to class names or ids; "
        f"{'regression and multi-label classification are' if key == 'label' else 'nested tags are'} not supported."
    )


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
            f"data.columns.{key}: {source}: {what} mix numbers and strings (got {number!r} at {number_at}, {text!r} "
            f"at {text_at}). Write every {what[:-1]} as a string, or every {what[:-1]} as an integer 0..N-1."
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
                f"data.columns.{key}: {at}: no label: the ClassLabel column marks an unlabelled row with -1, as "
                "SST-2's test split does (got -1). Train and evaluate on labelled splits."
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < feature.num_classes:
            raise DataError(
                f"data.columns.{key}: {at}: not a class id of the ClassLabel column ({', '.join(feature.names)}) "
                f"(got {value!r}). Fix the data."
            )
        names.append(feature.names[value])
    return names


def label_ids(values: list[Any], label_names: list[str], split: str, known_from: str, where: list[str]) -> list[int]:
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


# By a task's data.columns key for its labels (Task.label_column): how the label set is read from the
# training split.
LABEL_SETS = {"label": label_names_for, "tags": tag_names_for}
