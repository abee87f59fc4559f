"""Causal LM: the output head runs at the positions whose next token is trained, and nowhere else.

What it changes: prompt and padding positions skip the vocabulary-sized matrix product and the
B x L x vocab logits; the logits come back as one row per target, and the batch the loss reads carries
those targets (`NEXT_TOKEN_TARGETS`), so the loss reads the same either way.
Invariant (tests/unit/test_head_at_targets.py): the same loss, target count and gradients as the head
at every position. Measured gain: docs/benchmarks.md (benchmarks/speedups.py re-measures it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftcli.tasks.registry import IGNORE_INDEX, NEXT_TOKEN_TARGETS, Task, next_token_targets

TARGET_INDEX = "target_index"


def output_head(model: nn.Module, task: Task) -> nn.Module | None:
    """The (unwrapped) model's output head, when the task lets it run at the target positions only."""
    if not task.head_at_targets_only:
        return None
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def with_target_index(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with its target positions (flattened), found on the host before the batch goes to the
    device. Selecting them on the device with a boolean mask would make the host wait for the device
    at every micro-batch."""
    keep = (next_token_targets(batch) != IGNORE_INDEX).flatten()
    return batch | {TARGET_INDEX: keep.nonzero().squeeze(1)}


@contextmanager
def head_at_targets(head: nn.Module | None, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, `head` runs at the target positions of `batch` only (those of its
    TARGET_INDEX, when `with_target_index` added one). Yields the batch the loss reads: with the
    targets gathered in the same order once the head has run narrowed. When the hidden states do not
    line up with the labels (virtual tokens prepended), the head runs everywhere and the batch is unchanged."""
    for_loss = dict(batch)
    if head is None:
        yield for_loss
        return
    index = batch.get(TARGET_INDEX)
    keep = next_token_targets(batch) != IGNORE_INDEX if index is None else None

    def at_targets(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0]
        if hidden.shape[:2] != batch["labels"].shape:
            return None
        targets = next_token_targets(batch)
        if index is None:
            rows, for_loss[NEXT_TOKEN_TARGETS] = hidden[keep], targets[targets != IGNORE_INDEX]
        else:
            rows = hidden.flatten(0, 1).index_select(0, index)
            for_loss[NEXT_TOKEN_TARGETS] = targets.flatten().index_select(0, index)
        return (rows, *args[1:])

    handle = head.register_forward_pre_hook(at_targets)
    try:
        yield for_loss
    finally:
        handle.remove()
