"""Dropout on the CPU with masks drawn four to a 64-bit random integer, in training only.

What it changes: torch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`), then
multiplies by the mask and by 1 / (1 - p) in separate passes, and the backward again. Here one
`random_` call fills a quarter as many 64-bit integers, each read as four 15-bit numbers compared
against p, and a boolean mask is kept for the backward, as torch keeps its own. Every exact
`nn.Dropout` of the model is switched while training and switched back after; CUDA tensors keep
torch's fused dropout kernel.
Invariant (tests/unit/test_dropout_masks.py): the same distribution at a resolution of 1/32768
(p = 0.1 drops 3277/32768), output and gradient the mask times 1 / (1 - p), and the same masks under
gradient checkpointing: the random numbers come from torch's default generator, so a seeded run
repeats itself, and checkpointing restores that generator before recomputing. Measured gain:
docs/benchmarks.md (benchmarks/speedups.py re-measures it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

RESOLUTION = 1 << 15  # the 15 low bits of each 16-bit lane: the top lane of an int64 has no sign bit


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """True where an element is kept: each with probability 1 - round(p * 32768) / 32768."""
    count = shape.numel()
    lanes = torch.empty((count + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:count]
    return lanes.bitwise_and_(RESOLUTION - 1).ge(round(p * RESOLUTION)).view(shape)


def kept_scale(p: float) -> float:
    """1 / (1 - p) for the p the mask draws, so the expected output is the input."""
    return RESOLUTION / (RESOLUTION - round(p * RESOLUTION))


class _Masked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def draws_own_masks(p: float, device_type: str) -> bool:
    """Whether CheaperDropout draws its masks for this p on this device (torch draws them otherwise)."""
    return device_type == "cpu" and 0 < round(p * RESOLUTION) < RESOLUTION


class CheaperDropout(nn.Dropout):
    """nn.Dropout with masks from `keep_mask` on CPU tensors in training; torch's own otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not draws_own_masks(self.p, x.device.type):
            return super().forward(x)
        return _Masked.apply(x, keep_mask(x.shape, self.p), kept_scale(self.p))


@contextmanager
def cheaper_dropout(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switches the model's `nn.Dropout` modules to CheaperDropout inside the block; yields them."""
    switched = [m for m in model.modules() if type(m) is nn.Dropout]
    for module in switched:
        module.__class__ = CheaperDropout
    try:
        yield switched
    finally:
        for module in switched:
            module.__class__ = nn.Dropout
