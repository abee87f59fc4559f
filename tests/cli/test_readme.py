"""The figures README.md and the guides in docs/ quote from seeded runs are the runs' own
(scripts/readme_numbers.py prints them; the quickstart's are checked in tests/slow/test_real_models.py).
Their commands are checked in tests/cli/test_docs_commands.py."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def load_readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_numbers = load_readme_numbers()


def test_missing_quotes_are_reported() -> None:
    """The drift check fails when a figure changes: the README must quote the run's exact text."""
    quotes = {"quickstart table": "95.5% accuracy (best eval; 95.5% final)"}
    assert readme_numbers.missing(quotes, "| 95.5% accuracy (best eval; 95.5% final) |") == []
    assert readme_numbers.missing(quotes, "| 97.5% accuracy (best eval; 97.0% final) |") == [
        "README.md does not quote quickstart table as the run gives it: '95.5% accuracy (best eval; 95.5% final)'"
    ]


def test_entity_cell_lists_types_best_first() -> None:
    metrics = {"f1": 0.6354, "precision": 0.6, "recall": 0.68449, "accuracy": 0.9339}
    classes = {"per_class": {"ORG": {"f1": 0.5}, "PER": {"f1": 0.9}, "LOC": {"f1": 0.5}}}
    assert readme_numbers.entity_cell(metrics, classes) == (
        "entity F1 0.635 (precision 0.600, recall 0.684), token accuracy 0.934; per type F1: "
        "PER 0.900, LOC 0.500, ORG 0.500"
    )


def test_readme_says_where_its_figures_were_measured() -> None:
    """The seeded figures name the commit they were measured on and the script that printed them, in
    README.md and beside the table of docs/benchmarks.md that holds the others."""
    for path in (README, ROOT / "docs" / "benchmarks.md"):
        text = " ".join(path.read_text(encoding="utf-8").split())
        commits = re.findall(r"measured on ([0-9a-f]{7,}) by `python scripts/readme_numbers.py`", text)
        assert commits, f"{path.name} should say which commit its quoted figures were measured on"


def check_readme_quotes(quotes: dict[str, str], report: dict) -> None:
    """README.md or a guide in docs/ quotes each figure of a seeded run word for word. The figures hold
    for the precision `train.mixed_precision: auto` picked where they were measured (bf16 on a CPU that
    runs it natively, fp32 elsewhere): on a CPU where it picks another, the run rounds otherwise and this
    skips."""
    quoted = readme_numbers.readme_precision(README.read_text(encoding="utf-8"))
    assert quoted is not None, (
        "README.md should say which precision `train.mixed_precision: auto` picked for its figures"
    )
    text = readme_numbers.documented_text()
    ours = readme_numbers.precision_words(report["summary"]["mixed_precision"])
    if quoted != ours:
        pytest.skip(f"README.md's figures were measured in {quoted}; on this CPU auto picked {ours}")
    assert readme_numbers.missing(quotes, text, readme_numbers.WHERE) == [], (
        "run python scripts/readme_numbers.py and update README.md or docs/"
    )


@pytest.mark.slow
@pytest.mark.heavy  # a 45 s NER run; the quickstart's figures are checked in the default run (tests/slow)
def test_readme_quotes_the_ner_recipes_figures(tmp_path: Path) -> None:
    """The NER recipe trained as shipped, and evaluated on validation and test: docs/benchmarks.md
    quotes exactly these figures (scripts/readme_numbers.py prints them)."""
    run = tmp_path / "lora-ner"

    def peft(*args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "peftcli", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-2000:]

    peft("train", "recipes/lora-ner.yaml", f"output_dir={run}")
    peft("eval", str(run), "--out", str(tmp_path / "val.json"))
    peft("eval", str(run), "--split", "test", "--out", str(tmp_path / "test.json"))
    val, test = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("val", "test"))
    check_readme_quotes(readme_numbers.ner_quotes(run, val, test), json.loads((run / "report.json").read_text()))
