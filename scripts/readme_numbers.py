"""Runs the seeded runs README.md and docs/ quote and prints their figures, with the commit they were measured on.

    python scripts/readme_numbers.py                          # quickstart (1 and 2 processes) and the NER recipe
    python scripts/readme_numbers.py --only quickstart,ner    # a part of it
    python scripts/readme_numbers.py --check                  # and exit 1 where the docs quote other values

A seeded run on the CPU repeats itself to the byte, so its accuracy and F1 are facts of the code, the
libraries and the CPU's precision (`train.mixed_precision: auto` picks bf16 where the CPU runs it
natively, fp32 elsewhere): the script prints each as the exact text README.md or a guide in docs/
quotes (`quotes()`; the quickstart's in README.md, the measured runs in docs/benchmarks.md), and
tests/slow (the quickstart run of test_real_models.py, and tests/cli/test_readme.py for the NER recipe)
fail when the docs no longer contain it. Times, tokens/s and memory depend on the machine and its
load: they are printed with the load average, for the docs to quote once, with where they measured them.
Every run goes into a temporary folder; nothing is written into the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
WHERE = "README.md or docs/"
PARTS = ("quickstart", "quickstart-2proc", "ner")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def evals(run_dir: Path) -> list[dict[str, Any]]:
    """The eval records of a run's metrics.jsonl, in step order."""
    lines = (
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    return [r for r in lines if "eval_loss" in r]


def eval_value(record: dict[str, Any], key: str) -> float:
    return record[f"eval_{key}"]


def percent(x: float) -> str:
    return f"{x:.1%}"


def quickstart_quotes(report: dict[str, Any]) -> dict[str, str]:
    """The quickstart's accuracy as the docs quote it: in README.md's quickstart, and in the table of
    docs/benchmarks.md's measured runs."""
    best, final = report["best_metrics"]["accuracy"], report["final_metrics"]["accuracy"]
    precision = report["summary"]["mixed_precision"]
    return {
        "quickstart paragraph": (
            f"{percent(best)} validation accuracy at its best eval and {percent(final)} at the last "
            f"(`train.mixed_precision: auto` picked {precision_words(precision)}"
        ),
        "quickstart table": f"{percent(best)} accuracy (best eval; {percent(final)} final)",
    }


def precision_words(precision: str) -> str:
    return "fp32" if precision == "no" else f"{precision} autocast"


def readme_precision(text: str) -> str | None:
    """The precision the docs say their seeded figures were measured in, as precision_words() writes it."""
    found = re.search(r"`train\.mixed_precision: auto` picked (fp32|\w+ autocast)", " ".join(text.split()))
    return found.group(1) if found else None


def quickstart_2proc_quotes(report: dict[str, Any]) -> dict[str, str]:
    best, final = report["best_metrics"]["accuracy"], report["final_metrics"]["accuracy"]
    steps = report["summary"]["steps"]
    return {
        "quickstart 2 processes": (
            f"({steps} steps of 32) | {percent(best)} accuracy (best eval; {percent(final)} final)"
        )
    }


def entity_cell(metrics: dict[str, Any], classes: dict[str, Any] | None) -> str:
    """An eval's entity F1, precision, recall, token accuracy and (given the per-type scores) F1 per type,
    best first."""
    cell = (
        f"entity F1 {metrics['f1']:.3f} (precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}), "
        f"token accuracy {metrics['accuracy']:.3f}"
    )
    if classes:
        per_type = sorted(
            ((scores["f1"], name) for name, scores in classes["per_class"].items()), key=lambda t: (-t[0], t[1])
        )
        cell += "; per type F1: " + ", ".join(f"{name} {f1:.3f}" for f1, name in per_type)
    return cell


def ner_quotes(run_dir: Path, val: dict[str, Any], test: dict[str, Any]) -> dict[str, str]:
    """The NER recipe's figures: from its training (report.json, metrics.jsonl) and `peft eval` on the
    validation and test splits (eval.json files)."""
    report = read_json(run_dir / "report.json")
    s = report["summary"]
    steps = " → ".join(
        f"{eval_value(r, 'f1'):.3f} ({'step ' if i == 0 else ''}{r['step']})" for i, r in enumerate(evals(run_dir))
    )
    train_losses = [
        r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    per_type_test = {name: v["f1"] for name, v in test["classes"]["per_class"].items()}
    return {
        "ner training": (
            f"{s['trainable_parameters']:,} trainable of {s['total_parameters'] / 1e6:.1f} M "
            f"({s['trainable_percent']:.2f}%); validation entity F1 {steps}, token accuracy "
            f"{report['final_metrics']['accuracy']:.3f}"
        ),
        "ner validation": entity_cell(val["metrics"], val.get("classes")),
        "ner test": entity_cell(test["metrics"], test.get("classes")),
        "ner people": f"People are found from context (F1 {per_type_test['PER']:.2f} on test)",
        "ner losses": (
            f"The training loss ends at {train_losses[-1]:.2f} against {report['final_metrics']['loss']:.2f} "
            "on validation"
        ),
    }


def ner_base_quotes(val_base: dict[str, Any], test_base: dict[str, Any]) -> dict[str, str]:
    m, t = val_base["metrics"], test_base["metrics"]
    return {
        "ner validation base": f"entity F1 {m['f1']:.3f}, token accuracy {m['accuracy']:.3f}",
        "ner test base": f"entity F1 {t['f1']:.3f}, token accuracy {t['accuracy']:.3f}",
    }


def documented_text() -> str:
    """README.md and every guide in docs/, the text the quoted figures are looked for in."""
    return "\n".join(path.read_text(encoding="utf-8") for path in DOCS)


def missing(quotes: dict[str, str], text: str, where: str = "README.md") -> list[str]:
    """One line per quote the text does not contain, word for word (line breaks count as spaces)."""
    words = " ".join(text.split())
    return [
        f"{where} does not quote {name} as the run gives it: {quote!r}"
        for name, quote in quotes.items()
        if quote not in words
    ]


def peft(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "peftcli", *args], check=False, cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"peft {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def commit() -> str:
    """The short commit, and whether tracked files differ from it (their figures may then differ from the commit's)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT, capture_output=True, text=True
    ).stdout
    return head + (" (with uncommitted changes to tracked files)" if dirty.strip() else "")


def timing(report: dict[str, Any]) -> str:
    s = report["summary"]
    return (
        f"{s['wall_seconds']:.0f} s wall ({s['train_seconds']:.0f} s in the loop), {s['tokens_per_s']:,.0f} real "
        f"tok/s, peak {s['peak_memory_mb'] / 1000:.1f} GB, {s['cpu_threads']} threads, "
        f"{precision_words(s['mixed_precision'])}"
    )


def merge_said(stderr: str) -> str:
    said = " ".join(stderr.split())
    difference = re.search(r"largest logit difference (\S+)", said)
    model = re.search(r"load it with (\w+)\.from_pretrained", said)
    return (
        f"{model.group(1) if model else '?'}; largest logit difference merged vs adapted "
        f"{difference.group(1) if difference else '?'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {WHERE} does not quote a figure as measured")
    args = parser.parse_args()
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    print(
        f"measured on {commit()} by scripts/readme_numbers.py; load average before: "
        f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs"
    )
    quotes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="readme-numbers-") as tmp:
        out = Path(tmp)
        if "quickstart" in parts:
            peft("train", "recipes/quickstart.yaml", f"output_dir={out / 'quickstart'}")
            report = read_json(out / "quickstart" / "report.json")
            quotes |= quickstart_quotes(report)
            print(f"peft train recipes/quickstart.yaml: {timing(report)}")
        if "quickstart-2proc" in parts:
            peft("train", "recipes/quickstart.yaml", "--num-processes", "2", f"output_dir={out / 'quickstart-2'}")
            report = read_json(out / "quickstart-2" / "report.json")
            quotes |= quickstart_2proc_quotes(report)
            print(f"peft train recipes/quickstart.yaml --num-processes 2: {timing(report)}")
        if "ner" in parts:
            run = out / "lora-ner"
            peft("train", "recipes/lora-ner.yaml", f"output_dir={run}")
            report = read_json(run / "report.json")
            print(f"peft train recipes/lora-ner.yaml: {timing(report)}")
            for name, extra in [
                ("val", []),
                ("test", ["--split", "test"]),
                ("val-base", ["--base"]),
                ("test-base", ["--split", "test", "--base"]),
            ]:
                peft("eval", str(run), *extra, "--out", str(out / f"ner-{name}.json"))
            val, test = read_json(out / "ner-val.json"), read_json(out / "ner-test.json")
            quotes |= ner_quotes(run, val, test)
            quotes |= ner_base_quotes(read_json(out / "ner-val-base.json"), read_json(out / "ner-test-base.json"))
            merged = peft("merge", str(run), "--out", str(out / "merged-ner"))
            print(f"peft merge runs/lora-ner: {merge_said(merged.stderr + merged.stdout)}")
    for name, quote in quotes.items():
        print(f"{name}: {quote}")
    if args.check:
        problems = missing(quotes, documented_text(), WHERE)
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
