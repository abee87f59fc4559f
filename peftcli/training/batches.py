"""The loop's micro-batches: accumulation windows from a position in the data stream, and a batch on
the device and as the model's arguments."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftcli.errors import PeftcliError
from peftcli.tasks.registry import Task
from peftcli.training.speedups.head_at_targets import TARGET_INDEX
from peftcli.training.state import Position


def step_windows(
    loader: DataLoader, sampler: Any, grad_accum: int, steps: int, position: Position
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The accumulation windows of the next `steps` optimizer steps, epoch after epoch, from `position`
    (which they keep up to date: a resumed run skips the micro-batches it already took)."""
    taken = 0
    while taken < steps:
        # accelerate's loader counts its passes and sets the sampler's epoch from that count when a
        # pass starts: a resumed run sets the count as well, or it would replay epoch 0's order.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(position.epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(position.epoch)
        if len(loader) == 0:
            raise PeftcliError(
                "data: the training split gives no batch on this process; it needs at least one example per process."
            )
        for window in windows(islice(iter(loader), position.batches, None), grad_accum):
            position.batches += len(window)
            yield window
            taken += 1
            if taken >= steps:
                return
        position.epoch, position.batches = position.epoch + 1, 0


def windows(batches: Iterator[dict[str, torch.Tensor]], size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Groups micro-batches into the accumulation windows of one optimizer step each (the last may be short)."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on the device; from pinned memory the copy does not block the host."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], task: Task) -> dict[str, torch.Tensor]:
    """The forward pass's arguments: the labels too for an encoder-decoder, which shifts them into the
    decoder's input (the model then computes its own loss as well, which is not used)."""
    drop = (TARGET_INDEX,) if task.encoder_decoder else ("labels", TARGET_INDEX)
    return {k: v for k, v in batch.items() if k not in drop}
