"""The eval loop: the loss and the task's metrics over an eval loader, on any number of processes."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from peftcli.tasks.registry import Task
from peftcli.training.batches import model_inputs, on_device
from peftcli.training.distributed import gather_uneven, sharded
from peftcli.training.speedups.applied import ALL, PerBatch, applied
from peftcli.training.stops import is_out_of_memory, out_of_memory


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    preds: torch.Tensor | None  # classification: predicted and true label ids, gathered from all processes
    labels: torch.Tensor | None


@dataclass
class Sums:
    """This process's loss sum and loss terms, and its predicted and true ids, batch by batch."""

    loss: torch.Tensor
    units: torch.Tensor
    preds: list[torch.Tensor]
    labels: list[torch.Tensor]


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    accelerator: Accelerator,
    label_names: list[str] | None,
    on_batch: Callable[[], None] = lambda: None,
    speedups: frozenset[str] = ALL,
) -> EvalOutput:
    model.eval()
    sums = Sums(
        torch.zeros((), device=accelerator.device, dtype=torch.float64),
        torch.zeros((), device=accelerator.device, dtype=torch.float64),
        [],
        [],
    )
    # Sharded parameters (FSDP, ZeRO-3) are gathered in every forward: every process runs as many
    # forwards as the one with the most batches (the others run a one-example filler whose output
    # counts for nothing), or a collective would wait forever for its peer.
    fillers = filler_forwards(loader, accelerator) if sharded(accelerator) else 0
    # Where each process holds the whole model (DDP), evals run on it directly: DDP's own forward
    # broadcasts buffers, a collective that a process with fewer eval batches would leave unpaired.
    model = model if sharded(accelerator) else accelerator.unwrap_model(model)
    with no_grad_for(accelerator), applied(model, accelerator, task, False, speedups) as per_batch:
        for batch in loader:
            add_batch(sums, model, on_device(per_batch.on_host(batch), accelerator.device), task, per_batch)
            on_batch()
        for _ in range(fillers):
            filler = {k: v.to(accelerator.device) for k, v in loader.collate_fn([loader.dataset[0]]).items()}
            with per_batch.around(filler):
                model(**model_inputs(filler, task))
    return joined(sums, task, accelerator, label_names)


def add_batch(sums: Sums, model: nn.Module, batch: dict[str, torch.Tensor], task: Task, per_batch: PerBatch) -> None:
    try:
        with per_batch.around(batch) as for_loss:
            logits = model(**model_inputs(batch, task)).logits
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(exc, "eval", 0, [batch]) from None
    batch_loss, batch_units = task.loss_sum(logits, for_loss)
    sums.loss += batch_loss.double()
    sums.units += batch_units
    predicted = task.predictions(logits, batch)
    if predicted is not None:
        sums.preds.append(predicted[0])
        sums.labels.append(predicted[1])


def joined(sums: Sums, task: Task, accelerator: Accelerator, label_names: list[str] | None) -> EvalOutput:
    """Each process evaluated its own share of the examples (data.eval_loader): sums and rows are
    joined once at the end, so no example counts twice and uneven shares are fine."""
    preds = [torch.cat(sums.preds).cpu()] if sums.preds else []
    labels = [torch.cat(sums.labels).cpu()] if sums.labels else []
    total_loss = accelerator.reduce(sums.loss, reduction="sum").item()
    total_units = accelerator.reduce(sums.units, reduction="sum").item()
    has_preds = int(accelerator.reduce(torch.tensor(len(preds), device=accelerator.device), reduction="sum").item()) > 0
    all_preds = (
        gather_uneven(accelerator, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long))
        if has_preds
        else None
    )
    all_labels = (
        gather_uneven(accelerator, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
        if has_preds
        else None
    )
    return EvalOutput(
        task.metrics(total_loss, total_units, all_preds, all_labels, label_names or []), all_preds, all_labels
    )


def no_grad_for(accelerator: Accelerator) -> AbstractContextManager[Any]:
    """inference_mode where it is safe, no_grad where parameters are sharded: FSDP and ZeRO-3 cannot
    gather into inference tensors, and tensors made in inference mode cannot be saved for a later
    backward (HF Trainer evaluates under no_grad too)."""
    return torch.no_grad() if sharded(accelerator) else torch.inference_mode()


def filler_forwards(loader: DataLoader, accelerator: Accelerator) -> int:
    """How many forwards this process must add to match the process with the most eval batches."""
    mine = torch.tensor([len(loader)], device=accelerator.device)
    most = int(accelerator.reduce(mine, reduction="max").item()) if accelerator.num_processes > 1 else len(loader)
    return most - len(loader)
