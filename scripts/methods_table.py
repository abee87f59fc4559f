"""Trains every method's shipped SST-2 recipe on the same budget and writes docs/methods.md.

    python scripts/methods_table.py --data ../shared/data/sst2 --train-examples 8000
    python scripts/methods_table.py --only dora-sst2.yaml pissa-sst2.yaml   # those rows; the others stay
    python scripts/methods_table.py --table gsm8k --gsm8k-steps 20         # SmolLM2 on GSM8K: eval loss

Each row is one `peft train` in its own process (peak memory is per process), run one after the
other on a quiet machine: PERF.md measured that another busy process slows a 2-core run ~10x, so the
load average before each run is recorded beside it. `--report-only` rebuilds the page from the run
directories without training; a row without a run directory keeps its line from the page.

`--table gsm8k` trains the SmolLM2-135M-Instruct recipes of LoRA and its variants on a short budget
(`--gsm8k-steps` steps of the recipe's batch of 4, no accumulation, `--gsm8k-eval` test examples) and writes their
eval loss over the answer tokens between the gsm8k markers.
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
GSM8K_START, GSM8K_END = "<!-- gsm8k table: start -->", "<!-- gsm8k table: end -->"

# (row label, recipe) in the order of the table.
ROWS = [
    ("LoRA", "lora-sst2.yaml"),
    ("DoRA", "dora-sst2.yaml"),
    ("PiSSA", "pissa-sst2.yaml"),
    ("LoRA+", "loraplus-sst2.yaml"),
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


GSM8K_ROWS = [
    ("LoRA", "lora-smollm2-instruct.yaml"),
    ("DoRA", "dora-smollm2-instruct.yaml"),
    ("PiSSA", "pissa-smollm2-instruct.yaml"),
    ("LoRA+", "loraplus-smollm2-instruct.yaml"),
]


def command(recipe: str, data: str, examples: int, out: Path) -> list[str]:
    return [
        "peft",
        "train",
        f"recipes/{recipe}",
        f"data.dataset={data}",
        f"data.max_train_examples={examples}",
        f"output_dir={out}",
    ]


def gsm8k_command(recipe: str, data: str, steps: int, evals: int, out: Path) -> list[str]:
    return [
        "peft", "train", f"recipes/{recipe}", "data.dataset=null", f"data.files.train={data}/gsm8k_train.jsonl",
        f"data.files.test={data}/gsm8k_test.jsonl", f"train.max_steps={steps}", "train.grad_accum=1",
        f"train.eval_every={steps}", f"data.max_eval_examples={evals}", f"output_dir={out}",
    ]  # fmt: skip


def run(cmd: list[str], recipe: str, out: Path) -> dict:
    load = os.getloadavg()[0]
    cmd = cmd + ["--overwrite"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {
            "recipe": recipe,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
        }
    (out / "table-run.json").write_text(json.dumps({"load_average_before": load, "process_wall_seconds": wall}) + "\n")
    return {"recipe": recipe}


def kept_rows(page: str, start: str, end: str) -> dict[str, str]:
    """The table's current lines by their first cell: rows not re-run keep them."""
    if start not in page:
        return {}
    block = page[page.index(start) + len(start) : page.index(end)]
    return {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("| ") and " | " in line}


def row(label: str, recipe: str, data: str, examples: int, out: Path, kept: dict[str, str]) -> str:
    report_path = out / "report.json"
    if not report_path.is_file():
        shown = " ".join(command(recipe, data, examples, Path("runs/table") / out.name))
        return kept.get(label) or f"| {label} | not run | | | | | | | `{shown}` |"
    report = json.loads(report_path.read_text())
    extra = json.loads((out / "table-run.json").read_text()) if (out / "table-run.json").is_file() else {}
    s = report["summary"]
    acc = (report["best_metrics"] or report["final_metrics"]).get("accuracy", float("nan"))
    cmd = " ".join(command(recipe, data, examples, Path("runs/table") / out.name))
    return (
        f"| {label} | {s['trainable_parameters']:,} ({s['trainable_percent']:.2f}%) | "
        f"{s['adapter_bytes'] / 2**20:,.2f} MB | {100 * acc:.2f}% | {s['wall_seconds'] / 60:.1f} min | "
        f"{s['tokens_per_s']:,.0f} | {s['peak_memory_mb'] / 1024:.2f} GB "
        f"| {extra.get('load_average_before', float('nan')):.2f} | `{cmd}` |"
    )


def gsm8k_row(label: str, recipe: str, data: str, steps: int, evals: int, out: Path, kept: dict[str, str]) -> str:
    report_path = out / "report.json"
    cmd = " ".join(gsm8k_command(recipe, data, steps, evals, Path("runs/table") / out.name))
    if not report_path.is_file():
        return kept.get(label) or f"| {label} | not run | | | | | | `{cmd}` |"
    report = json.loads(report_path.read_text())
    extra = json.loads((out / "table-run.json").read_text()) if (out / "table-run.json").is_file() else {}
    s = report["summary"]
    loss = (report["best_metrics"] or report["final_metrics"]).get("loss", float("nan"))
    return (
        f"| {label} | {s['trainable_parameters']:,} ({s['trainable_percent']:.2f}%) | {loss:.4f} | "
        f"{s['wall_seconds'] / 60:.1f} min | {s['tokens_per_s']:,.0f} | {s['peak_memory_mb'] / 1024:.2f} GB | "
        f"{extra.get('load_average_before', float('nan')):.2f} | `{cmd}` |"
    )


def gsm8k_table(args: argparse.Namespace) -> None:
    data = str(Path(args.data).parent / "instruct") if args.data.endswith("sst2") else args.data
    for label, recipe in GSM8K_ROWS:
        if args.report_only or (args.only and recipe not in args.only):
            continue
        print(f"training {label} ({recipe})...", flush=True)
        out = args.runs / Path(recipe).stem
        print(
            json.dumps(run(gsm8k_command(recipe, data, args.gsm8k_steps, args.gsm8k_eval, out), recipe, out)),
            flush=True,
        )
    page = args.out.read_text()
    kept = kept_rows(page, GSM8K_START, GSM8K_END)
    lines = [
        (
            "SmolLM2-135M-Instruct on GSM8K, each recipe as shipped (gradient checkpointing, dropout 0.05) but "
            f"{args.gsm8k_steps} steps"
        ),
        (
            f"of 4 examples (no accumulation); eval loss over the answer tokens of the first {args.gsm8k_eval} test "
            "problems. 2-core CPU;"
        ),
        "written by `scripts/methods_table.py --table gsm8k`.",
        "",
        (
            "| method | trainable parameters | eval loss | wall time | train tok/s | peak memory | load avg before | "
            "command |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        gsm8k_row(label, recipe, data, args.gsm8k_steps, args.gsm8k_eval, args.runs / Path(recipe).stem, kept)
        for label, recipe in GSM8K_ROWS
    ]
    if GSM8K_START not in page:
        page = f"{page.rstrip()}\n\n{GSM8K_START}\n{GSM8K_END}\n"
    start, end = page.index(GSM8K_START) + len(GSM8K_START), page.index(GSM8K_END)
    args.out.write_text(page[:start] + "\n" + "\n".join(lines) + "\n" + page[end:])
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/sst2")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "table")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "methods.md",
        help="the table replaces the block between the table markers",
    )
    parser.add_argument("--only", nargs="*", help="recipe file names to (re)train; default all")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--table", choices=["sst2", "gsm8k"], default="sst2")
    parser.add_argument("--gsm8k-steps", type=int, default=20)
    parser.add_argument("--gsm8k-eval", type=int, default=32)
    args = parser.parse_args()
    if args.table == "gsm8k":
        gsm8k_table(args)
        return

    for label, recipe in ROWS:
        if args.report_only or (args.only and recipe not in args.only):
            continue
        print(f"training {label} ({recipe})...", flush=True)
        out = args.runs / Path(recipe).stem
        result = run(command(recipe, args.data, args.train_examples, out), recipe, out)
        print(json.dumps(result), flush=True)

    lines = [
        (
            f"SST-2 with all-MiniLM-L6-v2, the first {args.train_examples:,} training sentences (one pass), accuracy "
            "on the"
        ),
        "872 validation sentences; 2-core CPU, fp32, one run at a time. Written by `scripts/methods_table.py`.",
        "",
        (
            "| method | trainable parameters | adapter file | accuracy | wall time | train tok/s | peak memory | load "
            "avg before | command |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    page = args.out.read_text()
    kept = kept_rows(page, START, END)
    lines += [
        row(label, recipe, args.data, args.train_examples, args.runs / Path(recipe).stem, kept)
        for label, recipe in ROWS
    ]
    start, end = page.index(START) + len(START), page.index(END)
    args.out.write_text(page[:start] + "\n" + "\n".join(lines) + "\n" + page[end:])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
