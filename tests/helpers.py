"""Shared test steps: adapt a tiny model, randomize its adapter, train it a few steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from peftcli.data import eval_loader, prepare_data, train_loader
from peftcli.methods import Method, context_for
from peftcli.methods.base import Adapted
from peftcli.recipe import DataSpec, OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.tasks import TASKS
from peftcli.trainer import TrainResult, train
from tests.conftest import tiny_data_section


def adapt(model: torch.nn.Module, method: Method, task: str, **params: Any) -> tuple[Any, Adapted]:
    p = method.params(**params)
    return p, method.apply(model, p, context_for(model, TASKS[task].head_modules))


def randomize_trainable(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Adapters start as the identity; random values make every comparison meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def data_spec(task: str, data: dict[str, Path], **kw: Any) -> DataSpec:
    files, columns = tiny_data_section(task, data)
    return DataSpec(files=files, columns=columns, max_length=32, **kw)


def run_training(
    model: torch.nn.Module,
    task: str,
    tokenizer: Any,
    data: dict[str, Path],
    train_spec: TrainSpec,
    optim: OptimizerSpec | None = None,
    group_by_length: bool = True,
) -> TrainResult:
    prepared = prepare_data(data_spec(task, data), task, tokenizer)
    loader = train_loader(prepared.train, tokenizer.pad_token_id, train_spec.batch_size, train_spec.grad_accum, group_by_length, train_spec.seed)
    evals = eval_loader(prepared.eval, tokenizer.pad_token_id, 16)
    optim = optim or OptimizerSpec(lr=1e-2)
    schedule = ScheduleSpec(name="constant", warmup_steps=0)
    model.train()
    return train(model, TASKS[task], loader, evals, train_spec, optim, schedule, len(prepared.label_names or []), accelerator=Accelerator(cpu=True))
