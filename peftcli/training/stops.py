"""Why a training loop ends early: a signal asked it to stop, the loss diverged, or memory ran out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftcli.errors import first_line


@dataclass
class Stop:
    """Set from a signal handler; the loop saves a loop state at the next step boundary and raises Stopped."""

    signal: int | None = None

    def request(self, signum: int) -> None:
        self.signal = signum


class Stopped(Exception):
    def __init__(self, step: int, signal: int) -> None:
        super().__init__(f"stopped at step {step} by signal {signal}")
        self.step, self.signal = step, signal


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"the loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class OutOfMemory(Exception):
    """The device (or the host) ran out of memory on a batch: which step and what the batch held."""

    def __init__(self, phase: str, step: int, examples: int, length: int, detail: str) -> None:
        super().__init__(f"out of memory in {phase} at step {step}")
        self.phase, self.step, self.examples, self.length, self.detail = phase, step, examples, length, detail


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal (a RuntimeError that says so)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
    )


def out_of_memory(exc: BaseException, phase: str, step: int, batches: list[dict[str, torch.Tensor]]) -> OutOfMemory:
    first = first_line(exc, 160)
    examples = max(b["input_ids"].shape[0] for b in batches) if batches else 0
    length = max(b["input_ids"].shape[1] for b in batches) if batches else 0
    return OutOfMemory(phase, step, examples, length, first)
