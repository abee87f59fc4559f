"""`peft train RECIPE [key=value ...]`: recipe -> adapted model -> training -> run directory."""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any

import accelerate
import datasets
import torch
import transformers
from accelerate.utils import set_seed
from rich.console import Console

import peftcli
from peftcli.checkpoint import WEIGHTS_NAME, adapter_config, atomic_write_text, method_state, save_adapter
from peftcli.data import eval_loader, prepare_data, train_loader
from peftcli.errors import PeftcliError
from peftcli.methods import context_for, get_method
from peftcli.methods.base import Calibration, count_parameters
from peftcli.models import head_kwargs, load_base_model, load_tokenizer, model_location
from peftcli.recipe import Recipe, load_recipe
from peftcli.report import MetricsLog, write_report
from peftcli.tasks import TASKS, Task
from peftcli.trainer import Hooks, make_accelerator, train

console = Console(stderr=True, soft_wrap=True)


def run_train(recipe_path: Path, overrides: list[str], overwrite: bool = False) -> Path:
    started = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    run_dir = recipe.run_dir()
    check_run_dir(run_dir, overwrite)
    task, method = TASKS[recipe.task], get_method(recipe.method.name)
    accelerator = make_accelerator(recipe.train)

    console.print(f"[bold]{recipe.name}[/]: {method.name} on {recipe.model.name} ({recipe.task})")
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, recipe.task, tokenizer)
    model = load_base_model(recipe.model, task, **head_kwargs(task, data.label_names, tokenizer))
    t = recipe.train
    loader = train_loader(data.train, tokenizer.pad_token_id, t.batch_size, t.grad_accum, recipe.data.group_by_length, t.seed)
    evals = eval_loader(data.eval, tokenizer.pad_token_id, t.eval_batch_size or 2 * t.batch_size) if data.eval else None
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(recipe.train.seed)  # the adapter's random initialization is part of the recipe
    adapted = method.apply(model, recipe.method, context_for(model, task.head_modules))
    if method.calibrate is not None:
        model.to(accelerator.device)
        method.calibrate(model, recipe.method, adapted, calibration(loader, task, accelerator))
    trainable, total = count_parameters(model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    if run_dir.exists():
        shutil.rmtree(run_dir)  # only reached with --overwrite, after everything loaded
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / "recipe.yaml", resolved_recipe_text(recipe, recipe_path, overrides))
    is_main = accelerator.is_main_process
    best: dict[str, Any] = {}

    def snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # The config is taken with the weights: training may change it (AdaLoRA's rank pattern).
        config = adapter_config(method, recipe.method, adapted, task, model_location(recipe.model), recipe.model.revision)
        return method_state(method, model, adapted), config

    def on_eval(step: int, metrics: dict[str, float], improved: bool) -> None:
        if improved:
            best["snapshot"] = snapshot()

    def on_save(step: int) -> None:
        if is_main:
            save_step_checkpoint(run_dir, step, *snapshot(), data.label_names, t.save_total_limit)

    hooks = Hooks(on_log=MetricsLog(run_dir / "metrics.jsonl") if is_main else Hooks().on_log, on_eval=on_eval, on_save=on_save)
    method_hooks = method.training_hooks(model, recipe.method, adapted) if method.training_hooks is not None else None
    result = train(model, task, loader, evals, t, recipe.optimizer, recipe.schedule, len(data.label_names or []), hooks, accelerator, method_hooks)

    if is_main:
        state, config = best.get("snapshot") or snapshot()
        save_adapter(run_dir / "adapter", state, config, data.label_names, tokenizer)
        report = build_report(recipe, method.name, task, result, trainable, total, run_dir, time.perf_counter() - started, accelerator)
        write_report(run_dir, report, result.history, t.best_metric or task.best_metric)
        print_summary(report, run_dir)
    return run_dir


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise PeftcliError(
            f"{run_dir}: run directory already exists. Pass --overwrite to replace it, "
            "or give the run another name (name=NEW or output_dir=DIR)."
        )


def resolved_recipe_text(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> str:
    header = f"# Resolved from {recipe_path}" + (f" with {' '.join(overrides)}" if overrides else "")
    return f"{header}\n# Repeat this run: peft train {recipe.run_dir() / 'recipe.yaml'} output_dir=NEW_DIR\n{recipe.to_yaml()}"


def save_step_checkpoint(run_dir: Path, step: int, state: dict[str, torch.Tensor], config: dict[str, Any], labels: list[str] | None, keep: int) -> None:
    folder = run_dir / "checkpoints" / f"step-{step}"
    save_adapter(folder, state, config, labels)
    existing = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in existing[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def build_report(recipe: Recipe, method: str, task: Task, result: Any, trainable: int, total: int, run_dir: Path, wall: float, accelerator: Any) -> dict[str, Any]:
    adapter_bytes = (run_dir / "adapter" / WEIGHTS_NAME).stat().st_size
    seconds = max(result.train_seconds, 1e-9)
    return {
        "name": recipe.name,
        "method": method,
        "model": recipe.model.name,
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
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "mixed_precision": recipe.train.mixed_precision,
        },
        "final_metrics": result.final_metrics,
        "best_metrics": result.best_metrics,
        "best_step": result.best_step,
        "best_metric": recipe.train.best_metric or task.best_metric,
        "versions": {
            "peftcli": peftcli.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
    }


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    s = report["summary"]
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in (report["best_metrics"] or report["final_metrics"]).items())
    console.print(
        f"[bold green]done[/] in {s['wall_seconds']:.1f}s: {s['steps']} steps, "
        f"{s['tokens_per_s']:,.0f} tok/s, peak {s['peak_memory_mb']:,.0f} MB. {metrics}"
    )
    console.print(f"run directory: {run_dir}  (adapter in {run_dir / 'adapter'})")


def calibration(loader: Any, task: Task, accelerator: Any) -> Calibration:
    """Training batches and the task's mean loss, for methods that score parameters before training."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        total, count = task.loss_sum(model(**inputs).logits, batch)
        return total / count.clamp(min=1)

    return Calibration(batches=iter(loader), loss=loss)
