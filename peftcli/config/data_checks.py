"""Cross-checks of `data:`: one source (files or a dataset) that exists and holds examples, splits that
the files give, and the columns each task reads."""

from __future__ import annotations

from pathlib import Path

from peftcli.config.describe import Problems
from peftcli.config.paths import looks_like_path
from peftcli.config.schema import Columns, DataSpec
from peftcli.tasks.registry import TASKS


def _no_examples(path: Path) -> str | None:
    """Why a csv/tsv/json/jsonl file holds no examples, from its first lines only (loading an empty
    file fails deep inside `datasets` with a message that does not say so)."""
    if path.suffix.lower() not in (".csv", ".tsv", ".json", ".jsonl"):
        return None
    try:
        with path.open("rb") as f:
            lines = (line for line in f if line.strip())
            if next(lines, None) is None:
                return "the file is empty"
            if path.suffix.lower() in (".csv", ".tsv") and next(lines, None) is None:
                return "the file holds only a header row"
    except OSError:
        return None  # unreadable: loading it names the cause
    return None


def data_problems(data: DataSpec, task: str | None) -> Problems:
    problems = _source_problems(data) + _file_problems(data) + _split_problems(data)
    c = data.columns
    problems += _token_column_problems(c, task)
    if c.response_names is not None and task in TASKS and task not in ("seq2seq_lm", "token_classification"):
        problems.append(
            (
                ("data", "columns", "response_names"),
                f"names seq2seq_lm targets (got {c.response_names!r} with task {task}). Remove it.",
            )
        )
    if task == "sequence_classification":
        problems += _classification_column_problems(c)
    elif task == "causal_lm" and c.messages:
        if c.text or c.prompt or c.prompt_template or c.response:
            problems.append(
                (
                    ("data", "columns", "messages"),
                    (
                        "a conversation is the whole example: give `messages` alone, without text, prompt, "
                        "prompt_template or response."
                    ),
                )
            )
    elif task == "seq2seq_lm":
        problems += _seq2seq_column_problems(c)
    elif task == "causal_lm":
        problems += _causal_lm_column_problems(c)
    return problems


def _source_problems(data: DataSpec) -> Problems:
    """Exactly one of `dataset` and `files`; a local dataset folder that exists; no revision for local data."""
    problems: Problems = []
    if (data.dataset is None) == (data.files is None):
        problems.append((("data",), "give exactly one of `dataset` (a hub id) or `files` (split -> local files)."))
    if data.dataset and looks_like_path(data.dataset) and not Path(data.dataset).exists():
        problems.append(
            (
                ("data", "dataset"),
                f"local dataset folder not found (got {data.dataset!r}). Give a hub id or an existing folder.",
            )
        )
    if data.revision is not None and (data.files is not None or (data.dataset and Path(data.dataset).is_dir())):
        problems.append(
            (
                ("data", "revision"),
                (
                    f"applies to a hub dataset, not local files (got {data.revision!r}). "
                    "Remove it, or give data.dataset a hub id."
                ),
            )
        )
    return problems


def _file_problems(data: DataSpec) -> Problems:
    """Each of data.files is a file that exists and holds examples."""
    problems: Problems = []
    for split, files in (data.files or {}).items():
        for f in files:
            if Path(f).is_dir():
                problems.append(
                    (
                        ("data", "files", split),
                        f"a folder, not a file (got {f!r}). Name its files, or give the folder as data.dataset.",
                    )
                )
            elif not Path(f).is_file():
                problems.append(
                    (
                        ("data", "files", split),
                        f"file not found (got {f!r}). Relative paths in a recipe are relative to its folder.",
                    )
                )
            elif no_rows := _no_examples(Path(f)):
                problems.append((("data", "files", split), f"{no_rows} (got {f!r}). Give a file with examples."))
    return problems


def _split_problems(data: DataSpec) -> Problems:
    """The train and eval splits are among data.files' splits."""
    if data.files is None:
        return []
    problems: Problems = []
    for key, split in (("train_split", data.train_split), ("eval_split", data.eval_split)):
        if split is not None and split not in data.files:
            problems.append(
                (
                    ("data", key),
                    f"no such split in data.files (got {split!r}; files give {', '.join(data.files)}). "
                    f"Add data.files.{split}" + (" or set data.eval_split: null." if key == "eval_split" else "."),
                )
            )
    return problems


def _classification_column_problems(c: Columns) -> Problems:
    problems: Problems = []
    if not c.text:
        problems.append(
            (
                ("data", "columns", "text"),
                "sequence_classification needs the text column's name (e.g. text: sentence).",
            )
        )
    if not c.label:
        problems.append(
            (
                ("data", "columns", "label"),
                "sequence_classification needs the label column's name (e.g. label: label).",
            )
        )
    if c.messages:
        problems.append(
            (
                ("data", "columns", "messages"),
                (
                    f"chat data trains causal_lm only (got {c.messages!r} with task sequence_classification). "
                    "Remove it, or set task: causal_lm."
                ),
            )
        )
    return problems


def _causal_lm_column_problems(c: Columns) -> Problems:
    """causal_lm without a chat column: `text`, or a prompt (column or template) with a response."""
    problems: Problems = []
    has_prompt = bool(c.prompt or c.prompt_template)
    if c.text and (has_prompt or c.response):
        problems.append(
            (
                ("data", "columns"),
                "causal_lm takes either `text`, or `prompt`/`prompt_template` with `response`, not both.",
            )
        )
    elif not c.text and not (has_prompt and c.response):
        problems.append(
            (
                ("data", "columns"),
                "causal_lm needs `text`, `messages` (a chat column), or `response` with `prompt` or `prompt_template`.",
            )
        )
    problems += _both_prompts_problems(c)
    return problems


TOKEN_COLUMNS = ("tokens", "tags")


def _token_column_problems(c: Columns, task: str | None) -> Problems:
    """token_classification takes `tokens` and `tags` and nothing else; other tasks take neither."""
    if task is None:
        return []
    given = {k: v for k, v in c.model_dump().items() if v is not None}
    if task != "token_classification":
        return [
            (
                ("data", "columns", k),
                (
                    f"word-level columns train token_classification only (got {given[k]!r} with task {task}). "
                    "Remove it, or set task: token_classification."
                ),
            )
            for k in TOKEN_COLUMNS
            if k in given
        ]
    problems = [
        (("data", "columns", k), f"token_classification needs the {k} column's name (e.g. {k}: {k}): {what}.")
        for k, what in (("tokens", "a list of words per row"), ("tags", "a list of tags per row, one per word"))
        if k not in given
    ]
    problems += [
        (
            ("data", "columns", k),
            f"token_classification reads `tokens` and `tags` only (got {k}: {given[k]!r}). Remove it.",
        )
        for k in given
        if k not in TOKEN_COLUMNS
    ]
    return problems


def _seq2seq_column_problems(c: Columns) -> Problems:
    problems: Problems = []
    for key in ("text", "text_pair", "label", "messages"):
        if getattr(c, key):
            problems.append(
                (
                    ("data", "columns", key),
                    (
                        f"not used by seq2seq_lm (got {getattr(c, key)!r}). Give the source as `prompt` or "
                        "`prompt_template` and the target as `response`."
                    ),
                )
            )
    if not (c.prompt or c.prompt_template):
        problems.append(
            (
                ("data", "columns", "prompt"),
                "seq2seq_lm needs the source column's name (e.g. prompt: article), or a prompt_template.",
            )
        )
    problems += _both_prompts_problems(c)
    if not c.response:
        problems.append(
            (("data", "columns", "response"), "seq2seq_lm needs the target column's name (e.g. response: summary).")
        )
    return problems


def _both_prompts_problems(c: Columns) -> Problems:
    if c.prompt and c.prompt_template:
        return [(("data", "columns", "prompt_template"), "give `prompt` or `prompt_template`, not both.")]
    return []
