"""The end of a training run as the user sees it: report.json's figures gathered from the loop's result,
and the summary lines `peft train` prints when it is done."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import accelerate
import datasets
import torch
import transformers
from rich.console import Console
from rich.markup import escape

import peftcli
from peftcli.adapter_io import WEIGHTS_NAME
from peftcli.config.schema import Recipe
from peftcli.data.loading import data_commit
from peftcli.models.loading import model_commit
from peftcli.reporting.report import metric_label, weights_text
from peftcli.tasks.registry import Task

# emoji=False: a run named `a:fire:b` is printed as written (escape() leaves emoji codes).
console = Console(stderr=True, soft_wrap=True, emoji=False)


def build_report(
    recipe: Recipe,
    method: str,
    task: Task,
    result: Any,
    trainable: int,
    total: int,
    run_dir: Path,
    wall: float,
    accelerator: Any,
    *,
    weights: dict[str, int],
) -> dict[str, Any]:
    """report.json's content: what was trained, the run's figures (`weights`: weight_memory's of the
    base as loaded), its best and final metrics, and the versions it ran with."""
    adapter_bytes = (run_dir / "adapter" / WEIGHTS_NAME).stat().st_size
    seconds = max(result.train_seconds, 1e-9)
    return {
        "name": recipe.name,
        "method": method,
        "model": recipe.model.name,
        # The Hub commits loaded (model.revision / data.revision, or main, as it was): null for local files.
        "model_commit": model_commit(recipe.model),
        "data_commit": data_commit(recipe.data),
        "task": task.name,
        "summary": {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": 100 * trainable / total,
            "adapter_bytes": adapter_bytes,
            "steps": result.steps,
            "examples": result.examples,
            "tokens": result.tokens,
            "wall_seconds": wall,
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens / seconds,
            "examples_per_s": result.examples / seconds,
            "peak_memory_mb": result.peak_memory_mb,
            "weights_bytes": weights["weights"],
            "weights_bytes_unquantized": weights["weights_unquantized"],
            "quantization": quantization_text(recipe.model.quantization),
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "cpu_threads": torch.get_num_threads(),
            "mixed_precision": accelerator.mixed_precision,
            "mixed_precision_requested": recipe.train.mixed_precision,
            "tf32": bool(recipe.train.tf32 and torch.cuda.is_available()),
        },
        "final_metrics": result.final_metrics,
        "best_metrics": result.best_metrics,
        "best_step": result.best_step,
        "best_metric": recipe.train.best_metric or task.best_metric,
        "final_step": (eval_steps(result.history) or [None])[-1],
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    """The versions a run's figures depend on."""
    return {
        "peftcli": peftcli.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


def quantization_text(q: Any) -> str | None:
    """`4 bits (nf4)`, `8 bits (LLM.int8)`, or None for a float base."""
    if q is None:
        return None
    return "8 bits (LLM.int8)" if q.bits == 8 else f"4 bits ({q.quant_type or 'nf4'})"


def print_summary(report: dict[str, Any], run_dir: Path, history: list[dict[str, Any]]) -> None:
    """The end of a run, each figure named: the wall time against the time in training steps (the
    tokens/s are over those), and which eval's metrics are which (the saved adapter is the best one's)."""
    first, *evals = summary_lines(report, history)
    console.print(f"[bold green]done[/] {escape(first)}")
    for line in [*evals, f"run directory: {run_dir}  (adapter in {run_dir / 'adapter'})"]:
        console.print(line, markup=False)


def summary_lines(report: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """`in 32.0 s wall: 152 training steps took 23.5 s (the rest: loading, 4 evals, saving); ...`, then
    the best and the final eval. A resumed run's steps, tokens and step time count from its start, its
    wall time from this process's."""
    s, evals = report["summary"], len(eval_steps(history))
    rest = ["loading", f"{evals} eval{'s' if evals != 1 else ''}" if evals else "", "saving"]
    split = (
        f"the rest: {', '.join(filter(None, rest))}"
        if s["wall_seconds"] >= s["train_seconds"]
        else "since the run started"
    )
    speed = (
        f"{s['tokens_per_s']:,.0f} tok/s in the training steps ({s['tokens'] / max(s['wall_seconds'], 1e-9):,.0f} "
        "over the wall time)"
    )
    timing = f"in {s['wall_seconds']:.1f} s wall: {s['steps']} training steps took {s['train_seconds']:.1f} s ({split})"
    lines = [f"{timing}; {speed}, peak memory {s['peak_memory_mb']:,.0f} MB"]
    if s.get("quantization"):
        lines.append(
            f"base weights: {weights_text(s['weights_bytes'], s['weights_bytes_unquantized'], s['quantization'])}"
        )
    best, final = report.get("best_step"), report.get("final_step")
    if best is None or final is None:
        return [*lines, f"no eval: the adapter is the one of the last step, {s['steps']}"]
    first = report["best_metric"]
    if best == final:
        return [
            *lines,
            f"best and final eval, step {best} (the saved adapter): {metrics_text(report['best_metrics'], first)}",
        ]
    return [
        *lines,
        f"best eval, step {best} of {s['steps']} (the saved adapter): {metrics_text(report['best_metrics'], first)}",
        f"final eval, step {final}: {metrics_text(report['final_metrics'], first)}",
    ]


def metrics_text(metrics: dict[str, float], first: str) -> str:
    """`accuracy 0.9550  f1 0.9549  eval loss 0.1387`: the metric that picks the best eval first, and
    the loss named as the eval's (the progress lines show the training loss)."""
    names = sorted(metrics, key=lambda k: k != first)
    return "  ".join(f"{metric_label(k)} {metrics[k]:.4f}" for k in names)


def eval_steps(history: list[dict[str, Any]]) -> list[int]:
    """The steps at which the run evaluated, in order."""
    return [r["step"] for r in history if any(k.startswith("eval_") for k in r)]
