"""bf16 training on the CPU: torch's math attention kernel for sequences shorter than MATH_ATTENTION_BELOW.

What it changes: which scaled-dot-product attention kernel runs, nothing it computes. torch's CPU
flash-attention kernel has a slow bf16 backward for short sequences and a faster forward at every
length, so evals keep it, and so does fp32, where it wins.
Invariant (tests/unit/test_trainer.py): the math kernel is chosen below the threshold for bf16 on the
CPU and never elsewhere; both kernels compute the same attention. Measured gain and the threshold's
source: docs/benchmarks.md and benchmarks/attention_kernels.py (benchmarks/speedups.py re-measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_ATTENTION_BELOW = 192  # tokens: where flash's bf16 backward catches up (benchmarks/attention_kernels.py)

KernelChoice = Callable[[int], AbstractContextManager[Any]]


def any_kernel(length: int) -> AbstractContextManager[Any]:
    """torch's own choice of kernel, at any length."""
    return nullcontext()


@contextmanager
def math_attention(accelerator: Accelerator, model: nn.Module) -> Iterator[KernelChoice]:
    """Yields, for a training forward and backward of a batch this long, which kernels may run: the math
    kernel alone below MATH_ATTENTION_BELOW tokens in bf16 on the CPU, torch's choice otherwise."""
    bf16 = accelerator.mixed_precision == "bf16" or any(p.dtype == torch.bfloat16 for p in model.parameters())
    if accelerator.device.type != "cpu" or not bf16:
        yield any_kernel
    else:
        yield lambda length: sdpa_kernel(SDPBackend.MATH) if length < MATH_ATTENTION_BELOW else nullcontext()
