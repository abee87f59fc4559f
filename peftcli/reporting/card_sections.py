"""The sections of an adapter's model card that come from its run: the eval metrics (also as the
Hub's `model-index` metadata) and how it was trained (data, compute, recipe, versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.config.paths import is_hub_id
from peftcli.config.schema import Recipe
from peftcli.reporting.report import is_finite_number
from peftcli.tasks.registry import Task

# The Hub's pipeline tag per task, where transformers has a pipeline for it (v5 dropped text2text).
PIPELINE_TAGS = {
    "sequence_classification": "text-classification",
    "token_classification": "token-classification",
    "causal_lm": "text-generation",
}
TASK_WORDS = {
    "sequence_classification": "text classification",
    "token_classification": "token classification",
    "causal_lm": "causal language modeling",
    "seq2seq_lm": "sequence-to-sequence generation",
}


def metrics_section(report: dict[str, Any]) -> list[str]:
    """The eval metrics: the best eval's (the adapter saved) and the final one's."""
    columns = []
    if report.get("best_metrics") and report.get("best_step") is not None:
        columns.append((f"best eval (step {report['best_step']}: this adapter)", report["best_metrics"]))
    if report.get("final_metrics"):
        step = report.get("final_step")
        columns.append(("final eval" + (f" (step {step})" if step is not None else ""), report["final_metrics"]))
    if not columns:
        return []
    names = list(dict.fromkeys(n for _, metrics in columns for n in metrics))
    rows = ["| metric | " + " | ".join(head for head, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    rows += [f"| {n} | " + " | ".join(_num(metrics.get(n)) for _, metrics in columns) + " |" for n in names]
    return ["## Metrics\n", "\n".join(rows) + "\n"]


def model_index(
    title: str, task: Task, recipe: Recipe | None, report: dict[str, Any] | None
) -> list[dict[str, Any]] | None:
    """The adapter's eval metrics in the Hub's `model-index` form (results -> task, dataset, metrics;
    huggingface_hub's repocard_data.model_index_to_eval_results reads it). The metrics are the saved
    adapter's: the best eval's, else the final one's. None without metrics or eval data."""
    metrics = (report or {}).get("best_metrics") or (report or {}).get("final_metrics")
    if recipe is None or not metrics or recipe.data.eval_split is None:
        return None
    data = recipe.data
    if data.dataset and is_hub_id(data.dataset):
        dataset = {"name": data.dataset, "type": data.dataset, "split": data.eval_split} | (
            {"config": data.subset} if data.subset else {}
        )
    else:  # local files: named by their file names; the Hub expects a dataset id as `type`, there is none
        files = (data.files or {}).get(data.eval_split) or [data.dataset or "local files"]
        dataset = {"name": ", ".join(Path(f).name for f in files), "type": "local", "split": data.eval_split}
    values = [
        {"type": k, "value": round(v, 6) if isinstance(v, float) else v, "name": f"eval {k}"}
        for k, v in metrics.items()
        if is_finite_number(v)
    ]
    if not values:
        return None
    # The Hub's task id; text2text-generation names seq2seq there though transformers 5 has no such pipeline.
    kind_id = PIPELINE_TAGS.get(task.name) or ("text2text-generation" if task.encoder_decoder else task.name)
    kind = {"type": kind_id, "name": TASK_WORDS.get(task.name, task.name)}
    return [{"name": title, "results": [{"task": kind, "dataset": dataset, "metrics": values}]}]


def training_section(recipe: Recipe, report: dict[str, Any]) -> list[str]:
    """How it was trained: the data, the compute (report.json's summary), the resolved recipe and the
    versions of the libraries (as HF peft's card lists `### Framework versions`)."""
    s = report.get("summary", {})
    data = recipe.data
    source = (
        f"`{data.dataset}`" + (f" ({data.subset})" if data.subset else "")
        if data.dataset
        else ", ".join(f"`{f}`" for f in (data.files or {}).get(data.train_split, []))
    )
    compute = [
        f"- device: {s.get('device')}, {plural(s.get('num_processes') or 1, 'process', 'processes')}"
        + (f", {s['cpu_threads']} CPU threads" if s.get("device") == "cpu" and s.get("cpu_threads") else ""),
        f"- precision: {precision_text(s.get('mixed_precision'), recipe.model.dtype)} (train.mixed_precision: "
        f"{s.get('mixed_precision_requested')})"
        + (f"; base weights in {s['quantization']}" if s.get("quantization") else ""),
        (
            f"- {s.get('steps')} steps, {s.get('examples', 0):,} examples, {s.get('tokens', 0):,} tokens in "
            f"{s.get('train_seconds', 0):.1f} s ({s.get('tokens_per_s', 0):,.0f} tokens/s); "
            f"{s.get('wall_seconds', 0):.1f} s wall time in all"
        ),
    ]
    if s.get("peak_memory_mb"):
        compute.append(f"- peak memory: {s['peak_memory_mb']:,.0f} MB")
    fence = "````" if "```" in recipe.to_yaml() else "```"
    versions = [f"- {name} {version}" for name, version in report.get("versions", {}).items()]
    return [
        "## Training\n",
        f"Data: {source}, split `{data.train_split}`"
        + (f"; evaluated on `{data.eval_split}`" if data.eval_split else "")
        + ".\n",
        "### Compute\n",
        "\n".join(compute) + "\n",
        "### Recipe\n",
        (
            "The resolved recipe (the run folder's recipe.yaml): `peft train recipe.yaml output_dir=NEW_DIR` repeats "
            "the run.\n"
        ),
        f"{fence}yaml\n{recipe.to_yaml()}{fence}\n",
        "### Framework versions\n",
        "\n".join(versions) + "\n",
    ]


def precision_text(mixed: str | None, dtype: str) -> str:
    """accelerate's mixed_precision (`no`, `fp16`, `bf16`) over the base's model.dtype, in words."""
    return f"base weights in {dtype}, " + (
        "no mixed precision" if mixed in (None, "no") else f"{mixed} mixed precision"
    )


def plural(n: int, word: str, words: str) -> str:
    return f"{n} {word if n == 1 else words}"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
