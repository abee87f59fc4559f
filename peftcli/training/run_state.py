"""One training run's state while the loop runs: what it started from, what it trains, and its saves into
the run directory (the best eval's adapter, step checkpoints, and at the end the adapter and report)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from peftcli.adapter_io import (
    PREFIX,
    WEIGHTS_NAME,
    atomic_write_text,
    check_whole,
    read_adapter_config,
    read_state,
    write_adapter,
)
from peftcli.config.schema import Recipe
from peftcli.data.prepare import PreparedData
from peftcli.errors import CheckpointError
from peftcli.methods.base import Method, trainable_parameters
from peftcli.models.adapters import adapter_config, method_state, save_adapter
from peftcli.models.loading import base_name
from peftcli.reporting import trackers as tracking
from peftcli.reporting.html import write_run_html
from peftcli.reporting.model_card import run_card, write_card
from peftcli.reporting.report import MetricsLog, write_report
from peftcli.reporting.run_report import build_report, print_summary
from peftcli.tasks.registry import Task
from peftcli.training.checkpoints import BEST, abandon_after, checkpoint_dir, save_checkpoint, write_loop_state
from peftcli.training.distributed import on_main
from peftcli.training.loop import Hooks
from peftcli.training.resume import resolved_recipe_text, resume_command
from peftcli.training.run_dir import Replacement, RunLock
from peftcli.training.state import LoopState, TrainResult

# emoji=False: a run named `a:fire:b` is printed as written (escape() leaves emoji codes).
console = Console(stderr=True, soft_wrap=True, emoji=False)

Snapshot = tuple[dict[str, torch.Tensor], dict[str, Any]]  # an adapter's weights and its config


@dataclass
class Start:
    """What a run starts from, settled before anything loads."""

    run_dir: Path
    accelerator: Any
    trackers: list[Any]
    keep: list[tuple[Path, str]]  # what --overwrite must never delete
    task: Task
    method: Method
    loop: LoopState | None = None  # a resumed run's loop state, read from the checkpoint `resumed_from`
    resumed_from: Path | None = None


@dataclass
class Parts:
    """What a run trains: the base model with its adapter, and the data."""

    tokenizer: Any  # as it loaded, for the adapter folder
    data: PreparedData
    fingerprint: str | None  # the data's, on the main process (it alone writes checkpoints)
    model: torch.nn.Module
    adapted: Any
    loader: Any
    evals: Any
    weights: dict[str, int]  # weight_memory of the base as loaded, before the adapter
    trainable: int
    total: int


def best_snapshot(checkpoint: Path) -> Snapshot | None:
    """The best eval's adapter a checkpoint holds, if it holds one."""
    if not (checkpoint / BEST).is_dir():
        return None
    return read_state(checkpoint / BEST / WEIGHTS_NAME), read_adapter_config(checkpoint / BEST)


class Run:
    """A run between the loop's hooks: the best eval's snapshot, the last step saved, the adapter kept at
    the end, and the saves that write them. From `take_run_dir` on, this process is the run directory's
    one writer (run_dir.py) until `lock` is released."""

    def __init__(
        self,
        recipe: Recipe,
        recipe_path: Path,
        overrides: list[str],
        overwrite: bool,
        start: Start,
        parts: Parts,
        started: float,
    ) -> None:
        self.recipe, self.recipe_path, self.overrides, self.overwrite = recipe, recipe_path, overrides, overwrite
        self.start, self.parts, self.started = start, parts, started
        self.run_dir, self.accelerator = start.run_dir, start.accelerator
        self.is_main = start.accelerator.is_main_process
        self.lock, self.replacement = RunLock(start.run_dir), Replacement(start.run_dir)
        # Before any sharding: the shapes every trainable tensor must have when it is saved.
        self.whole = {PREFIX + n: tuple(p.shape) for n, p in trainable_parameters(parts.model).items()}
        self.resume_hint = resume_command(recipe_path, overrides, start.accelerator)
        self.best: Snapshot | None = None
        self.saved_step: int | None = start.loop.step if start.loop is not None else None
        self.final: Snapshot | None = None

    def take_run_dir(self) -> None:
        """On the main process: the lock; then a new run's folder and recipe.yaml (an old run it replaces
        waits aside), or the checkpoints newer than the one a resumed run starts from, moved aside."""
        self.lock.acquire()
        loop = self.start.loop
        if loop is None:
            self.replacement.begin(self.overwrite, self.start.keep)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = resolved_recipe_text(self.recipe, self.recipe_path, self.overrides)
            atomic_write_text(self.run_dir / "recipe.yaml", text)
            return
        for abandoned in abandon_after(self.run_dir, loop.step):
            console.print(
                f"{escape(str(abandoned))}: newer than the checkpoint this run resumes from; moved aside, "
                "and deleted at this run's first save"
            )

    def hooks(self) -> Hooks:
        """Every record to metrics.jsonl, then to the trackers (main process only); the saves below."""
        loop, accelerator = self.start.loop, self.accelerator
        history = loop.result["history"] if loop is not None else []
        on_log = (
            MetricsLog(self.run_dir / "metrics.jsonl", history, lambda line: console.print(escape(line)))
            if self.is_main
            else Hooks().on_log
        )
        if self.start.trackers:
            on_main(accelerator, lambda: tracking.start(accelerator, self.recipe.model_dump(mode="json"), history))
            on_log = tracking.logging_to(accelerator, on_log) if self.is_main else on_log
        return Hooks(on_log=on_log, on_eval=self.on_eval, on_save=self.on_save, on_end=self.on_end)

    def snapshot(self) -> Snapshot:
        """The adapter now. The config is taken with the weights: training may change it (AdaLoRA's rank
        pattern)."""
        method, recipe, parts = self.start.method, self.recipe, self.parts
        config = adapter_config(
            method, recipe.method, parts.adapted, self.start.task, base_name(recipe.model), recipe.model.revision
        )
        state = method_state(method, parts.model, parts.adapted)
        if method.state is None:  # a method's own export may reshape (AdaLoRA drops pruned ranks)
            check_whole(state, self.whole)
        return state, config

    def on_eval(self, step: int, metrics: dict[str, float], improved: bool) -> None:
        if improved:
            self.best = self.snapshot()

    def on_save(self, step: int, state: LoopState | None) -> None:
        """A step checkpoint: the adapter, the best eval's, and the loop state to resume from."""

        def write(folder: Path) -> None:
            write_adapter(folder, *self.snapshot(), self.parts.data.label_names)
            if self.best is not None:
                write_adapter(folder / BEST, *self.best)
            if state is not None:
                write_loop_state(folder, state, self.accelerator.num_processes, self.parts.fingerprint)

        folder = checkpoint_dir(self.run_dir, step)
        try:
            save_checkpoint(folder, state, self.accelerator, write, self.recipe.train.save_total_limit)
        except OSError as exc:
            raise CheckpointError(self.save_failed(folder, "checkpoint", exc)) from None
        self.saved_step = step
        if self.is_main:
            self.replacement.saved()

    def on_end(self) -> None:
        self.final = self.best or self.snapshot()

    def end(self, result: TrainResult) -> None:
        """On the main process: the adapter (the best eval's), report.json/md/html, the model card, the
        trackers' summary, and the summary lines."""
        recipe, parts, method, task = self.recipe, self.parts, self.start.method, self.start.task
        assert self.final is not None, "the loop ends with on_end"
        adapter = self.run_dir / "adapter"
        try:
            save_adapter(adapter, *self.final, parts.data.label_names, parts.tokenizer)
        except OSError as exc:
            raise CheckpointError(self.save_failed(adapter, "adapter", exc)) from None
        self.replacement.saved()
        wall = time.perf_counter() - self.started
        report = build_report(
            recipe,
            method.name,
            task,
            result,
            parts.trainable,
            parts.total,
            self.run_dir,
            wall,
            self.accelerator,
            weights=parts.weights,
        )
        write_report(self.run_dir, report)
        write_card(adapter, run_card(recipe, method, task, parts.data.label_names, report, adapter))
        write_run_html(self.run_dir, report, result.history)
        tracking.log_summary(self.accelerator, report)
        tracking.close(self.accelerator)
        print_summary(report, self.run_dir, result.history)

    def failed(self) -> None:
        """A run that stops before its end: its trackers' runs marked failed, an old run it replaces put back."""
        if self.is_main:
            tracking.close(self.accelerator, failed=True)
            self.replacement.failed()

    def last_checkpoint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved"
        return f"the last good checkpoint is {checkpoint_dir(self.run_dir, self.saved_step)}"

    def save_failed(self, where: Path, what: str, exc: OSError) -> str:
        """A save that failed (a full disk): what is kept, and how to go on from it."""
        reason = exc.strerror or str(exc)
        if self.saved_step is None:
            return (
                f"{where}: could not save the {what} ({reason}); no checkpoint was saved before it. "
                "Free disk space, then train again."
            )
        return (
            f"{where}: could not save the {what} ({reason}); the checkpoint before it, "
            f"{checkpoint_dir(self.run_dir, self.saved_step)}, is kept. Free disk space, then resume with: "
            f"{self.resume_hint}"
        )
