"""Trains every method's shipped SST-2 recipe on the same budget and writes docs/methods.md.

    python scripts/methods_table.py --data ../shared/data/sst2 --train-examples 8000

Each row is one `peft train` in its own process (peak memory is per process), run one after the
other on a quiet machine: PERF.md measured that another busy process slows a 2-core run ~10x, so the
load average before each run is recorded beside it. `--report-only` rebuilds the page from the run
directories without training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

START, END = "<!-- table: start -->", "<!-- table: end -->"

# (row label, recipe) in the order of the table.
ROWS = [
    ("LoRA", "lora-sst2.yaml"),
    ("AdaLoRA", "adalora-sst2.yaml"),
    ("(IA)^3", "ia3-sst2.yaml"),
    ("prefix tuning", "prefix-tuning-sst2.yaml"),
    ("prompt tuning", "prompt-tuning-sst2.yaml"),
    ("P-tuning", "p-tuning-sst2.yaml"),
    ("bottleneck (Houlsby)", "bottleneck-sst2.yaml"),
    ("bottleneck (Pfeiffer)", "bottleneck-pfeiffer-sst2.yaml"),
    ("gradient selection", "selective-sst2.yaml"),
    ("BitFit", "bitfit-sst2.yaml"),
    ("full fine-tuning", "full-sst2.yaml"),
]


def command(recipe: str, data: str, examples: int, out: Path) -> list[str]:
    return ["peft", "train", f"recipes/{recipe}", f"data.dataset={data}", f"data.max_train_examples={examples}", f"output_dir={out}"]


def run(recipe: str, data: str, examples: int, out: Path) -> dict:
    load = os.getloadavg()[0]
    cmd = command(recipe, data, examples, out) + ["--overwrite"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {"recipe": recipe, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    (out / "table-run.json").write_text(json.dumps({"load_average_before": load, "process_wall_seconds": wall}) + "\n")
    return {"recipe": recipe}


def row(label: str, recipe: str, data: str, examples: int, out: Path) -> str:
    report_path = out / "report.json"
    if not report_path.is_file():
        return f"| {label} | not run | | | | | | | `{' '.join(command(recipe, data, examples, out))}` |"
    report = json.loads(report_path.read_text())
    extra = json.loads((out / "table-run.json").read_text()) if (out / "table-run.json").is_file() else {}
    s = report["summary"]
    acc = (report["best_metrics"] or report["final_metrics"]).get("accuracy", float("nan"))
    cmd = " ".join(command(recipe, data, examples, Path("runs/table") / out.name))
    return (
        f"| {label} | {s['trainable_parameters']:,} ({s['trainable_percent']:.2f}%) | {s['adapter_bytes'] / 2**20:,.2f} MB "
        f"| {100 * acc:.2f}% | {s['wall_seconds'] / 60:.1f} min | {s['tokens_per_s']:,.0f} | {s['peak_memory_mb'] / 1024:.2f} GB "
        f"| {extra.get('load_average_before', float('nan')):.2f} | `{cmd}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/sst2")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "table")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "methods.md", help="the table replaces the block between the table markers")
    parser.add_argument("--only", nargs="*", help="recipe file names to (re)train; default all")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    for label, recipe in ROWS:
        if args.report_only or (args.only and recipe not in args.only):
            continue
        print(f"training {label} ({recipe})...", flush=True)
        result = run(recipe, args.data, args.train_examples, args.runs / Path(recipe).stem)
        print(json.dumps(result), flush=True)

    lines = [
        f"SST-2 with all-MiniLM-L6-v2, the first {args.train_examples:,} training sentences (one pass), accuracy on the",
        "872 validation sentences; 2-core CPU, fp32, one run at a time. Written by `scripts/methods_table.py`.",
        "",
        "| method | trainable parameters | adapter file | accuracy | wall time | train tok/s | peak memory | load avg before | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(label, recipe, args.data, args.train_examples, args.runs / Path(recipe).stem) for label, recipe in ROWS]
    page = args.out.read_text()
    start, end = page.index(START) + len(START), page.index(END)
    args.out.write_text(page[:start] + "\n" + "\n".join(lines) + "\n" + page[end:])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
