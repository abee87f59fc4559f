"""Loading a split: local files (csv, tsv, json, jsonl, parquet) or a Hub dataset at a pinned commit,
trimmed to max_*_examples, its text checked to be UTF-8."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow

from peftcli.config.paths import is_hub_id
from peftcli.config.schema import DataSpec
from peftcli.data import hub
from peftcli.errors import DataError, first_line

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAVE_AS_UTF8 = "Save the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)."


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
        detail = _detail(exc)
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
        detail = _detail(cause)
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
                    return (
                        f"{path}: line {number}: not UTF-8 text (got byte 0x{line[exc.start]:02x} at byte offset "
                        f"{offset + exc.start})"
                    )
                offset += len(line)
    return None


def _detail(exc: BaseException) -> str:
    """A parse error's first line for a one-line DataError ("" when it has none)."""
    return first_line(exc, 300).rstrip(".") if str(exc).strip() else ""


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a load failure at error level before raising it; the DataError reports it once."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def split_source(spec: DataSpec, split: str) -> str:
    """The file(s) or dataset a split is read from, for error messages."""
    if spec.files is not None:
        files = spec.files.get(split, [])
        return files[0] if len(files) == 1 else str(files)
    return f"{spec.dataset} split {split!r}"
