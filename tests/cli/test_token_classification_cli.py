"""`peft train` / `peft eval` for token classification on the tiny BERT tagger: a run end to end (tags in
labels.json, entity scores per type in eval.json) and bad input refused in one line each, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.cli import app
from tests.cli.test_bad_inputs import refused
from tests.conftest import NER_TAGS, write_jsonl

TOK = "token_classification"


def ner_recipe(tiny_ner: dict[str, Path], **data: Any) -> dict[str, Any]:
    return {
        "name": "ner",
        "task": TOK,
        "model": {"name": str(tiny_ner["model"])},
        "method": {"name": "lora", "rank": 4, "alpha": 8},
        "data": {
            "files": {"train": str(tiny_ner["train"]), "validation": str(tiny_ner["validation"])},
            "columns": {"tokens": "tokens", "tags": "tags"},
            "max_length": 32,
        }
        | data,
        "optimizer": {"lr": 2e-2},
        "train": {"batch_size": 16, "max_steps": 4, "eval_every": 4, "seed": 0},
    }


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(work: Path, recipe: dict[str, Any]) -> Path:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_then_eval_reports_entities_per_type(work: Path, tiny_ner: dict[str, Path]) -> None:
    path = write(work, ner_recipe(tiny_ner))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output + result.stderr
    run = work / "runs" / "ner"
    assert json.loads((run / "adapter" / "labels.json").read_text())["labels"] == NER_TAGS
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((run / "eval.json").read_text())
    assert set(report["metrics"]) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert set(report["classes"]["per_class"]) <= {"PER", "LOC", "ORG"}
    assert report["classes"]["per_class"]["PER"]["support"] > 0
    assert report["words_cut"] == 0


def test_columns_of_another_task_are_refused_all_at_once(work: Path, tiny_ner: dict[str, Path]) -> None:
    path = write(work, ner_recipe(tiny_ner, columns={"text": "tokens", "label": "tags"}))
    refused(
        work,
        "train",
        str(path),
        lines=[
            (
                f"{path}: data.columns.tokens: token_classification needs the tokens column's name (e.g. tokens: "
                "tokens): a list of words per row."
            ),
            (
                f"{path}: data.columns.tags: token_classification needs the tags column's name (e.g. tags: tags): "
                "a list of tags per row, one per word."
            ),
            (
                f"{path}: data.columns.text: token_classification reads `tokens` and `tags` only (got text: 'tokens'). "
                "Remove it."
            ),
            (
                f"{path}: data.columns.label: token_classification reads `tokens` and `tags` only (got label: 'tags'). "
                "Remove it."
            ),
        ],
    )
    recipe = ner_recipe(tiny_ner) | {"task": "sequence_classification"}
    path = write(work, recipe)
    refused(
        work,
        "validate",
        str(path),
        lines=[
            (
                f"{path}: data.columns.tokens: word-level columns train token_classification only (got 'tokens' with "
                "task sequence_classification). Remove it, or set task: token_classification."
            ),
            (
                f"{path}: data.columns.tags: word-level columns train token_classification only (got 'tags' with task "
                "sequence_classification). Remove it, or set task: token_classification."
            ),
            f"{path}: data.columns.text: sequence_classification needs the text column's name (e.g. text: sentence).",
            f"{path}: data.columns.label: sequence_classification needs the label column's name (e.g. label: label).",
        ],
    )


def test_a_row_with_more_tags_than_words_is_refused(work: Path, tiny_ner: dict[str, Path]) -> None:
    bad = write_jsonl(
        work / "bad.jsonl",
        [
            {"tokens": ["john", "lives"], "tags": ["B-PER", "O"]},
            {"tokens": ["mary", "works"], "tags": ["B-PER", "O", "O"]},
        ],
    )
    path = write(work, ner_recipe(tiny_ner, files={"train": str(bad), "validation": str(tiny_ner["validation"])}))
    refused(
        work,
        "train",
        str(path),
        lines=[f"data.columns.tags: {bad}: row 2: 2 tokens but 3 tags. Give exactly one tag per word."],
    )


def test_dry_run_shows_each_word_tag_on_its_first_sub_token(work: Path, tiny_ner: dict[str, Path]) -> None:
    one = write_jsonl(
        work / "one.jsonl",
        [{"tokens": ["Zorvath", "Quenby", "lives", "in", "Paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}],
    )
    path = write(work, ner_recipe(tiny_ner, files={"train": str(one), "validation": str(one)}, max_length=6))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "[CLS] zor/B-PER ##va ##th qu/I-PER [SEP]" in result.output
    assert "train: 1 examples, 6 tokens; labels: B-PER 1, I-PER 1; 3 words cut by data.max_length 6" in result.output
