"""The speed tricks a training or eval loop enters, in one place, and the ones that act per micro-batch.

Each trick is a context manager in its own module of this package, with the invariant its test proves;
`applied` enters those that apply to the model and task, for the whole loop. `names` picks which may
(all by default): benchmarks/speedups.py switches each off by leaving it out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from peftcli.tasks.registry import Task
from peftcli.training.precision import low_precision
from peftcli.training.speedups.attention_kernel import KernelChoice, any_kernel, math_attention
from peftcli.training.speedups.dropout_masks import cheaper_dropout, draws_own_masks
from peftcli.training.speedups.first_position import first_position_only
from peftcli.training.speedups.head_at_targets import head_at_targets, output_head, with_target_index

FIRST_POSITION = "first_position"
CHEAPER_DROPOUT = "cheaper_dropout"
MATH_ATTENTION = "math_attention"
HEAD_AT_TARGETS = "head_at_targets"
ALL = frozenset({FIRST_POSITION, CHEAPER_DROPOUT, MATH_ATTENTION, HEAD_AT_TARGETS})


@dataclass(frozen=True)
class PerBatch:
    """The tricks that act on each micro-batch: the attention kernel for its length, and the output
    head at its target positions. The default changes nothing."""

    attention: KernelChoice = any_kernel
    head: nn.Module | None = None
    entered: frozenset[str] = frozenset()  # the tricks that change something here (benchmarks/speedups.py reads it)

    def on_host(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The host batch with what the tricks need found there (without waiting for the device)."""
        return with_target_index(batch) if self.head is not None else batch

    @contextmanager
    def around(self, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Around a micro-batch's forward, loss and backward (gradient checkpointing recomputes the forward
        in the backward, and must choose the same kernel); yields the batch the loss reads."""
        with self.attention(batch["input_ids"].shape[1]), head_at_targets(self.head, batch) as for_loss:
            yield for_loss


NO_SPEEDUPS = PerBatch()


@contextmanager
def applied(
    model: nn.Module, accelerator: Accelerator, task: Task, training: bool, names: frozenset[str] = ALL
) -> Iterator[PerBatch]:
    """Enters the tricks in `names` that apply, for a training loop (`training`) or an eval; yields
    the per-batch ones. Evals keep torch's attention kernels and dropout (it draws nothing there)."""
    inner = accelerator.unwrap_model(model)
    entered: set[str] = set()
    with ExitStack() as stack:
        narrow = FIRST_POSITION in names and not low_precision(accelerator, model)  # it pays in fp32 only
        if narrow and stack.enter_context(first_position_only(model, inner, task.reads_one_position)):
            entered.add(FIRST_POSITION)
        if training and CHEAPER_DROPOUT in names:
            switched = stack.enter_context(cheaper_dropout(model))
            if any(draws_own_masks(m.p, accelerator.device.type) for m in switched):
                entered.add(CHEAPER_DROPOUT)
        attention = any_kernel
        if training and MATH_ATTENTION in names:
            attention = stack.enter_context(math_attention(accelerator, model))
            if attention is not any_kernel:
                entered.add(MATH_ATTENTION)
        head = output_head(inner, task) if HEAD_AT_TARGETS in names else None
        if head is not None:
            entered.add(HEAD_AT_TARGETS)
        yield PerBatch(attention, head, frozenset(entered))
