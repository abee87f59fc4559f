"""`peft eval TARGET`: metrics of an adapter (or of the base model, --base) on the recipe's eval split
or on other data given as data.* overrides; prints a table and writes eval.json (one file per split
and mode: eval-test.json, eval-base.json, eval-test-base.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from peftcli.adapter_io import atomic_write_text, write_json
from peftcli.config.data_checks import data_problems
from peftcli.config.describe import describe
from peftcli.config.overrides import parse_override, set_path
from peftcli.config.paths import resolve_data_paths
from peftcli.config.schema import DataSpec
from peftcli.data.batching import eval_loader
from peftcli.data.prepare import prepare_eval_data
from peftcli.data.tokenize import words_cut
from peftcli.errors import RecipeError
from peftcli.models.target import Built, Target, build, resolve_target
from peftcli.tasks.generation import Decoding, complete, greedy_answers
from peftcli.tasks.registry import IGNORE_INDEX
from peftcli.tasks.text_metrics import generation_scores
from peftcli.training.evaluation import evaluate

console = Console(stderr=True, soft_wrap=True, emoji=False)


def run_eval(
    target_path: Path,
    overrides: list[str],
    split: str | None = None,
    max_examples: int | None = None,
    batch_size: int = 64,
    out: Path | None = None,
    base: bool = False,
    generate: int = 0,
    max_new_tokens: int = 128,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluates the adapter of `target_path` (or with `base` the base model alone) on the eval split
    and writes eval.json (or `out`); returns its content.

        peft eval runs/lora-sst2 --max-examples 200
    """
    target = resolve_target(target_path, overrides)
    if labels:
        target.label_names = with_label_names(target, labels)
    spec = eval_data_spec(target, overrides, split, max_examples)
    out = out or default_output(target, base, spec.eval_split)
    if out.is_dir():
        raise RecipeError(
            f"--out: a folder, not a file (got '{out}'). Give a file name, e.g. --out {out / 'eval.json'}."
        )
    built = build(target, with_adapter=not base)
    merged = merge_for_eval(built)
    task = target.task
    data = prepare_eval_data(spec, task.name, built.tokenizer, target.label_names)

    accelerator = Accelerator()
    loader = eval_loader(
        data, built.tokenizer.pad_token_id, batch_size, accelerator.process_index, accelerator.num_processes
    )
    model = accelerator.prepare(built.model)
    with Progress(console=console, transient=True, disable=not accelerator.is_main_process) as progress:
        bar = progress.add_task("eval", total=len(loader))
        result = evaluate(model, loader, task, accelerator, target.label_names, lambda: progress.advance(bar))

    report = eval_report(target, base, spec, data, merged, result)
    samples = None
    if task.generation_metrics:
        scores, samples = generation_eval(built.model, built.tokenizer, loader, spec.max_target_length, accelerator)
        report["metrics"] |= scores
        report["generation"] = {"decoding": "greedy", "max_new_tokens": spec.max_target_length}
    if generate:
        samples = (
            samples[:generate]
            if samples is not None
            else generate_samples(built.model, built.tokenizer, data, generate, max_new_tokens)
        )
        path = out.with_name(out.stem + "-generations.jsonl")
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
        report["generations"] = str(path)
    if base and new_head(built.model, task):
        report["head"] = UNTRAINED_HEAD
    if accelerator.is_main_process:
        replaced = out.is_file()
        write_json(out, report)
        print_report(report, out, replaced)
    return report


def eval_report(target: Target, base: bool, spec: DataSpec, data: Any, merged: Any, result: Any) -> dict[str, Any]:
    """eval.json's content: what was evaluated on which split, its metrics, and per-class details."""
    task = target.task
    report: dict[str, Any] = {
        "target": str(target.path),
        "adapter": None if base else str(target.adapter_dir),
        "model": target.model.name,
        "task": task.name,
        "split": spec.eval_split,
        "examples": len(data),
        "merged": merged,
        "metrics": result.metrics,
    }
    if result.preds is not None and result.labels is not None and target.label_names and task.details is not None:
        report["classes"] = task.details(result.preds, result.labels, target.label_names)
    if "num_words" in data.column_names:
        # Words past data.max_length have no sub-token left: neither predicted nor counted as gold.
        report["words_cut"] = words_cut(data)
    return report


UNTRAINED_HEAD = (
    "untrained (the base checkpoint has none for these labels: newly initialized, as `peft train` starts it)"
)


def new_head(model: torch.nn.Module, task: Any) -> bool:
    """Whether a classification head was made for the eval rather than loaded: a checkpoint saved from
    another class (all-MiniLM-L6-v2 is a `BertModel`) has no weights for a BertForSequenceClassification's
    classifier, and transformers initializes it."""
    saved_as = getattr(getattr(model, "config", None), "architectures", None) or []
    return task.label_column is not None and type(model).__name__ not in saved_as


def merge_for_eval(built: Built) -> bool:
    """Folds a mergeable adapter into float32 base weights before the eval: the same logits up to
    rounding, without the adapter's own products and sums in every adapted layer. Weights in 16 bits
    keep the adapter apart: rounding the sum would lose most of a small update."""
    method = built.method
    if method is None or method.merge is None or any(p.dtype != torch.float32 for p in built.model.parameters()):
        return False
    method.merge(built.model)
    return True


def with_label_names(target: Target, labels: list[str]) -> list[str]:
    """--labels names the classes of an adapter that has no labels.json (HF peft saves none)."""
    if target.task.label_column is None:
        raise RecipeError(f"--labels: only classification tasks have labels (the task is {target.task.name}).")
    if target.label_names is not None and len(labels) != len(target.label_names):
        raise RecipeError(
            f"--labels: the adapter's head has {len(target.label_names)} classes (got {len(labels)}: "
            f"{', '.join(labels)})."
        )
    return labels


def eval_data_spec(target: Target, overrides: list[str], split: str | None, max_examples: int | None) -> DataSpec:
    """The recipe's data section (or, for a bare adapter, data.* overrides) narrowed to the eval split."""
    raw: dict[str, Any] = target.recipe.data.model_dump() if target.recipe is not None else {}
    origin = str(target.path)
    if target.recipe is None:
        for item in overrides:
            key, value = parse_override(item)
            if key[0] == "data":
                set_path(raw, key[1:], value)
        origin = "data overrides"
        if not raw:
            raise RecipeError(
                f"{target.path}: an adapter folder without a run recipe needs its eval data, e.g. "
                "data.files.validation=val.jsonl data.columns.text=text data.columns.label=label"
            )
    raw["eval_split"] = split or raw.get("eval_split") or "validation"
    raw["train_split"] = raw["eval_split"]  # eval reads this one split only
    if max_examples is not None:
        raw["max_eval_examples"] = max_examples
    try:
        spec = DataSpec.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(
            *(f"{origin}: data.{'.'.join(map(str, e['loc']))}: {describe(e, DataSpec)}" for e in exc.errors())
        ) from None
    spec = resolve_data_paths(spec, Path.cwd(), {("data",): "override"})
    # Eval reads one split, named by --split (train_split is set to it): a missing one is reported once.
    problems = [
        (loc, m)
        for loc, m in data_problems(spec, target.task.name)
        if loc not in (("data", "train_split"), ("data", "eval_split"))
    ]
    if spec.files is not None and spec.eval_split not in spec.files:
        problems.append(
            (
                ("--split",),
                (
                    f"no such split in data.files (got {spec.eval_split!r}; files give {', '.join(spec.files)}). "
                    f"Choose one of them, or add data.files.{spec.eval_split}=FILE."
                ),
            )
        )
    if problems:
        raise RecipeError(*(f"{origin}: {'.'.join(loc)}: {message}" for loc, message in problems))
    return spec


def default_output(target: Target, base: bool, split: str) -> Path:
    """One file per split and mode, so that no eval replaces another's: eval.json for the split the run
    evaluated on while training (as its report), eval-<split>.json for any other, and -base with --base
    (eval-base.json, eval-test-base.json)."""
    parts = ["eval"]
    if split != trained_split(target):
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("._") or "split")
    name = "-".join([*parts, *(["base"] if base else [])]) + ".json"
    return (target.run_dir / name) if target.run_dir is not None else Path(name)


def trained_split(target: Target) -> str:
    """The eval split of the run's own recipe.yaml, whatever overrides now say (`validation` where the
    run had none, or where there is no run: the split `peft eval` reads by default)."""
    if target.run_dir is None:
        return "validation"
    try:
        saved = yaml.safe_load((target.run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "validation"
    data = saved.get("data") if isinstance(saved, dict) else None
    split = data.get("eval_split") if isinstance(data, dict) else None
    return split if isinstance(split, str) and split else "validation"


@torch.inference_mode()
def generate_samples(
    model: torch.nn.Module, tokenizer: Any, data: Any, n: int, max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy answers to the first n eval prompts, beside the reference answers."""
    model.eval()
    samples = []
    for row in data.select(range(min(n, len(data)))):
        ids, labels = row["input_ids"], row["labels"]
        start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids))
        samples.append(
            {
                "prompt": tokenizer.decode(ids[:start], skip_special_tokens=True),
                "reference": tokenizer.decode(
                    [t for t in labels[start:] if t != IGNORE_INDEX], skip_special_tokens=True
                ),
                "generated": complete(model, tokenizer, ids[:start], Decoding(max_new_tokens=max_new_tokens)),
            }
        )
    return samples


def generation_eval(
    model: torch.nn.Module, tokenizer: Any, loader: Any, max_new_tokens: int, accelerator: Accelerator
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """ROUGE-L and exact match of greedy answers to every eval example (each process answers its own
    share), and the answers as samples."""
    with Progress(console=console, transient=True, disable=not accelerator.is_main_process) as progress:
        bar = progress.add_task("generate", total=len(loader))
        sources, generated, references = greedy_answers(
            model, tokenizer, tracked(loader, lambda: progress.advance(bar)), max_new_tokens
        )
    sources, generated, references = (
        gather_object(x) if accelerator.num_processes > 1 else x for x in (sources, generated, references)
    )
    samples = [{"prompt": s, "reference": r, "generated": g} for s, g, r in zip(sources, generated, references)]
    return generation_scores(generated, references), samples


def tracked(items: Any, advance: Any) -> Any:
    for item in items:
        yield item
        advance()


def print_report(report: dict[str, Any], out: Path, replaced: bool = False) -> None:
    """The split, the labels (labels.json, --labels) and the paths are the user's text: escaped, never markup."""
    base = " - base model" + (", untrained head" if "head" in report else "") if report["adapter"] is None else ""
    title = f"{report['task']} on {report['split']} ({report['examples']} examples){base}"
    # Not in a terminal (a pipe, a file), the title and each row are a line whatever the width: rich
    # wraps a table's title at the table's width and its rows at 80 columns.
    terminal = console.is_terminal
    table = Table(title=escape(title) if terminal else None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report["metrics"].items():
        table.add_row(escape(key), f"{value:.4f}")
    for name, c in report.get("classes", {}).get("per_class", {}).items():
        if "f1" in c:  # entity types
            scores = f"{c['precision']:.4f} / {c['recall']:.4f} / {c['f1']:.4f}"
            table.add_row(escape(f"{name} ({c['support']}): precision / recall / f1"), scores)
        else:
            table.add_row(escape(f"{name}: precision / recall"), f"{c['precision']:.4f} / {c['recall']:.4f}")
    if not terminal:
        console.print(title, markup=False)
    # print(width=) can only narrow a console: a wide one of its own, on the same stream.
    (console if terminal else Console(stderr=True, emoji=False, width=1000)).print(table)
    if report.get("words_cut"):
        console.print(
            f"{report['words_cut']} words past data.max_length were cut: not predicted, and their entities not counted."
        )
    if "confusion_matrix" in report.get("classes", {}):
        classes = report["classes"]
        console.print(
            f"confusion matrix (rows true, columns predicted; {', '.join(classes['labels'])}): "
            f"{classes['confusion_matrix']}",
            markup=False,
        )
    if "head" in report:
        console.print(
            f"The base model's classification head is {report['head']}: these metrics are near chance and measure "
            "that head, not the base model's features. A trained run's gain over them is its adapter's and its "
            "trained head's together.",
            markup=False,
        )
    written = f"wrote {out}" + (f" and {report['generations']}" if "generations" in report else "")
    console.print(written + (" (replacing the file there)" if replaced else ""), markup=False)
