"""What `peft train` and `peft eval` tell a user who pipes them or runs them twice (issue 24): whole
log lines on one stream (stderr) when the output is not a terminal, an end line that names each
figure, and one eval file per split and mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from peftcli.commands import evaluate
from peftcli.commands.evaluate import new_head, run_eval
from tests.cli.test_cli import ROOT, write_recipe
from tests.conftest import tiny_recipe

CLS = "sequence_classification"


@pytest.fixture(scope="module")
def piped(tmp_path_factory, tiny_dirs, tiny_data) -> SimpleNamespace:
    """A tiny run trained with its output in pipes, and a terminal width far narrower than its lines
    (rich wraps at the width, 80 columns when the output is not a terminal)."""
    root = tmp_path_factory.mktemp("piped")
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS, output_dir=str(root / "run"))
    result = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(write_recipe(root, recipe))],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False, env=os.environ | {"COLUMNS": "40"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = root / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((run / "report.json").read_text())
    return SimpleNamespace(
        run=run, stdout=result.stdout, lines=result.stderr.splitlines(), history=history, report=report
    )


def test_piped_training_prints_whole_lines_on_stderr(piped: SimpleNamespace) -> None:
    assert piped.stdout == ""  # one stream: the eval lines went to stdout, the rest to stderr
    # Each log record and each eval is one line, whatever the width (6 steps, logged every 2, evals at 3 and 6).
    logs = [r for r in piped.history if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6]
    for r in logs:
        line = (
            f"step {r['step']}/6: train loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s (the "
            "last 2 steps)"
        )
        assert line in piped.lines
    evals = [r for r in piped.history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    best = piped.report["best_step"]
    for r in evals:
        line = (
            f"step {r['step']}/6 eval: loss {r['eval_loss']:.4f}  accuracy {r['eval_accuracy']:.4f}  f1 "
            f"{r['eval_f1']:.4f}"
        )
        if r["step"] == 3 or r["step"] == best:  # the first eval is the best so far, and so is the best
            line += "  (best accuracy so far)"
        assert line in piped.lines
    # No bar is drawn into a pipe.
    assert not any("━" in line for line in piped.lines)


def test_the_end_lines_name_each_figure(piped: SimpleNamespace) -> None:
    s, r = piped.report["summary"], piped.report
    done = next(i for i, line in enumerate(piped.lines) if line.startswith("done in "))
    first, *evals, where = piped.lines[done:]
    assert first == (
        f"done in {s['wall_seconds']:.1f} s wall: 6 training steps took {s['train_seconds']:.1f} s (the rest: "
        f"loading, 2 evals, saving); {s['tokens_per_s']:,.0f} tok/s in the training steps "
        f"({s['tokens'] / s['wall_seconds']:,.0f} over the wall time), "
        f"peak memory {s['peak_memory_mb']:,.0f} MB"
    )

    def metrics(m: dict[str, float]) -> str:
        return f"accuracy {m['accuracy']:.4f}  eval loss {m['loss']:.4f}  f1 {m['f1']:.4f}"

    assert r["final_step"] == 6
    if r["best_step"] == 6:
        assert evals == [f"best and final eval, step 6 (the saved adapter): {metrics(r['best_metrics'])}"]
    else:
        assert evals == [
            f"best eval, step 3 of 6 (the saved adapter): {metrics(r['best_metrics'])}",
            f"final eval, step 6: {metrics(r['final_metrics'])}",
        ]
    assert where == f"run directory: {piped.run}  (adapter in {piped.run / 'adapter'})"


def test_each_split_and_mode_has_its_own_eval_file(piped: SimpleNamespace, tiny_data) -> None:
    test_split = [f"data.files.test={tiny_data['sentiment_validation']}"]
    run_eval(piped.run, [])
    run_eval(piped.run, [], base=True)
    first = (piped.run / "eval.json").read_bytes()
    run_eval(piped.run, test_split, split="test")
    run_eval(piped.run, test_split, split="test", base=True)
    written = {p.name: json.loads(p.read_text()) for p in piped.run.glob("eval*.json")}
    assert {name: (e["split"], e["adapter"] is None) for name, e in written.items()} == {
        "eval.json": ("validation", False),  # the split the run evaluated on while training
        "eval-base.json": ("validation", True),
        "eval-test.json": ("test", False),
        "eval-test-base.json": ("test", True),
    }
    assert (piped.run / "eval.json").read_bytes() == first  # the test split replaced nothing
    # The same data under both names gives the same metrics: each file holds its own eval.
    assert written["eval-test.json"]["metrics"] == pytest.approx(written["eval.json"]["metrics"], rel=1e-6)


def test_eval_says_when_it_replaces_an_earlier_file(piped: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    out = piped.run / "again.json"
    run_eval(piped.run, [], out=out)
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote {out}"
    run_eval(piped.run, [], out=out)
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote {out} (replacing the file there)"


def config(architectures: list[str] | None) -> Any:
    return SimpleNamespace(architectures=architectures)


def test_a_base_head_made_for_the_eval_is_called_untrained() -> None:
    classification, lm = SimpleNamespace(label_column="label"), SimpleNamespace(label_column=None)

    class BertForSequenceClassification:
        def __init__(self, architectures: list[str] | None) -> None:
            self.config = config(architectures)

    # all-MiniLM-L6-v2 was saved as a BertModel: its classifier is made, randomly, at load.
    assert new_head(BertForSequenceClassification(["BertModel"]), classification)
    assert new_head(BertForSequenceClassification(None), classification)
    # A checkpoint saved from the classification class has its head.
    assert not new_head(BertForSequenceClassification(["BertForSequenceClassification"]), classification)
    assert not new_head(BertForSequenceClassification(["BertModel"]), lm)  # no head to speak of


def test_piped_eval_prints_each_table_row_whole(piped: SimpleNamespace, capsys, monkeypatch) -> None:
    # A console as narrow as a pipe's could be (COLUMNS=30): the rows would wrap at its width.
    monkeypatch.setattr(evaluate, "console", Console(stderr=True, soft_wrap=True, emoji=False, width=30))
    report = run_eval(piped.run, [], out=piped.run / "narrow.json")
    err = capsys.readouterr().err.splitlines()
    assert "sequence_classification on validation (32 examples)" in err  # the title: a line, not the table's width
    for name, c in report["classes"]["per_class"].items():
        cells = (f"{name}: precision / recall", f"{c['precision']:.4f} / {c['recall']:.4f}")
        assert any(all(cell in line for cell in cells) for line in err), err
    assert any("accuracy" in line and f"{report['metrics']['accuracy']:.4f}" in line for line in err)
