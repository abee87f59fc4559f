"""Shared test steps: adapt a tiny model, randomize its adapter, train it a few steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from peftcli.config.schema import DataSpec, OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.data.batching import eval_loader, train_loader
from peftcli.data.prepare import prepare_data
from peftcli.methods import Method, context_for
from peftcli.methods.base import Adapted, Calibration, TrainingHooks
from peftcli.tasks.registry import TASKS
from peftcli.training.batches import model_inputs
from peftcli.training.loop import train
from peftcli.training.state import TrainResult
from tests.conftest import tiny_data_section


def adapt(model: torch.nn.Module, method: Method, task: str, **params: Any) -> tuple[Any, Adapted]:
    """Applies `method` as `peft train` does, calibrating on random batches where the method needs it."""
    p = method.params(**params)
    adapted = method.apply(model, p, context_for(model, TASKS[task].head_modules))
    if method.calibrate is not None:
        method.calibrate(model, p, adapted, Calibration(iter(random_batches(model, task)), mean_loss(task)))
    return p, adapted


def random_batches(
    model: torch.nn.Module, task: str, n: int = 4, size: int = 4, length: int = 12, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Labelled batches of random token ids (no tokenizer needed), the last two positions padded."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(4, model.config.vocab_size, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        ids[0, -2:] = 0
        if task == "sequence_classification":
            labels = torch.randint(0, model.config.num_labels, (size,), generator=g)
        elif task == "token_classification":
            labels = torch.randint(0, model.config.num_labels, (size, length), generator=g).masked_fill(mask == 0, -100)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def mean_loss(task: str) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = TASKS[task].loss_sum(model(**model_inputs(batch, TASKS[task])).logits, batch)
        return total / count.clamp(min=1)

    return loss


def training_hooks(model: torch.nn.Module, method: Method, params: Any, adapted: Adapted) -> TrainingHooks | None:
    return method.training_hooks(model, params, adapted) if method.training_hooks is not None else None


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
    method_hooks: TrainingHooks | None = None,
) -> TrainResult:
    prepared = prepare_data(data_spec(task, data), task, tokenizer)
    loader = train_loader(
        prepared.train,
        tokenizer.pad_token_id,
        train_spec.batch_size,
        train_spec.grad_accum,
        group_by_length,
        train_spec.seed,
    )
    evals = eval_loader(prepared.eval, tokenizer.pad_token_id, 16)
    optim = optim or OptimizerSpec(lr=1e-2)
    schedule = ScheduleSpec(name="constant", warmup_steps=0)
    model.train()
    return train(
        model=model,
        task=TASKS[task],
        train_data=loader,
        eval_data=evals,
        spec=train_spec,
        optim=optim,
        schedule=schedule,
        label_names=prepared.label_names,
        accelerator=Accelerator(cpu=True),
        method_hooks=method_hooks,
    )
