"""The loop's state at a step boundary: the counters and evals so far (`TrainResult`), the data position,
and everything a run needs to go on exactly as if it had never stopped (`LoopState`, `capture`,
`restore`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from peftcli.errors import PeftcliError
from peftcli.methods.base import TrainingHooks, trainable_parameters
from peftcli.tasks.registry import higher_is_better


@dataclass
class Position:
    """Where the data stream stands: the epoch, and the micro-batches this process has taken from it."""

    epoch: int = 0
    batches: int = 0


@dataclass
class LoopState:
    """Everything the loop needs to go on from a step boundary as if it had never stopped: the
    trainable parameters, optimizer, schedule, grad scaler, the method's own training state, this
    process's random number generators and the data position. `peftcli.training.checkpoints` stores it."""

    step: int
    position: Position
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    method: tuple[dict[str, torch.Tensor], dict[str, Any]] | None
    result: dict[str, Any]
    rng: dict[str, Any]


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    tokens: int
    examples: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    peak_memory_mb: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0

    CARRIED = (
        "steps",
        "train_seconds",
        "tokens",
        "examples",
        "final_metrics",
        "best_metrics",
        "best_step",
        "history",
        "skipped_steps",
    )

    def carried(self) -> dict[str, Any]:
        """What a resumed run takes over: the counters, the evals so far and the log."""
        return {k: getattr(self, k) for k in self.CARRIED}

    def add_step(self, tokens: int, examples: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.examples += examples
        self.train_seconds += seconds

    def track_eval(self, step: int, metrics: dict[str, float], metric: str) -> bool:
        """Records an eval; True when it is the best so far by `metric` (ties keep the earlier one). A
        NaN or infinite value is never the best (a NaN compares False with everything, so a first NaN
        would stay best for good), and any finite value beats one (a best kept from before)."""
        if metric not in metrics:
            raise PeftcliError(f"train.best_metric: {metric!r} is not an eval metric (metrics: {', '.join(metrics)}).")
        self.final_metrics = metrics
        best = self.best_metrics.get(metric)
        value = metrics[metric]
        improved = math.isfinite(value) and (
            best is None or not math.isfinite(best) or (value > best if higher_is_better(metric) else value < best)
        )
        if improved:
            self.best_metrics, self.best_step = metrics, step
        return improved


@dataclass
class Training:
    """What the loop trains and with what: the (prepared) model, its optimizer and schedule, the
    accelerator and the method's training hooks. `capture` and `restore` read and write all of it."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    accelerator: Accelerator
    method_hooks: TrainingHooks


def capture(step: int, position: Position, training: Training, result: TrainResult) -> LoopState:
    unwrapped = training.accelerator.unwrap_model(training.model)
    scaler = training.accelerator.scaler
    method_hooks = training.method_hooks
    return LoopState(
        step=step,
        position=Position(position.epoch, position.batches),
        params={n: p.detach().cpu().clone() for n, p in trainable_parameters(unwrapped).items()},
        optimizer=training.optimizer.state_dict(),
        scheduler=training.scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        method=method_hooks.state() if method_hooks.state is not None else None,
        result=result.carried(),
        rng=rng_state(),
    )


def restore(state: LoopState, training: Training, result: TrainResult, position: Position) -> None:
    load_parameters(state, training.accelerator.unwrap_model(training.model))
    training.optimizer.load_state_dict(state.optimizer)
    training.scheduler.load_state_dict(state.scheduler)
    scaler = training.accelerator.scaler
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)
    if state.method is not None and training.method_hooks.load_state is not None:
        training.method_hooks.load_state(*state.method)
    for key, value in state.result.items():
        setattr(result, key, value)
    position.epoch, position.batches = state.position.epoch, state.position.batches
    set_rng_state(state.rng)


def load_parameters(state: LoopState, unwrapped: nn.Module) -> None:
    """The checkpoint's trainable parameters into the model, refused where names or shapes differ."""
    params = trainable_parameters(unwrapped)
    if set(params) != set(state.params):
        missing, extra = sorted(set(params) - set(state.params)), sorted(set(state.params) - set(params))
        raise PeftcliError(
            f"--resume: the checkpoint's trainable parameters do not match this model's (missing {missing[:3]}, "
            f"unexpected {extra[:3]}). Resume with the recipe the run was started with."
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state.params[name].shape:
                raise PeftcliError(
                    f"--resume: {name} has shape {tuple(state.params[name].shape)} in the checkpoint and "
                    f"{tuple(p.shape)} in this model. Resume with the recipe the run was started with."
                )
            p.copy_(state.params[name])


def rng_state() -> dict[str, Any]:
    """This process's generators: torch (CPU and CUDA), Python's and NumPy's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
