"""Sequence classification: the last transformer block's attention output and feed-forward at the first
position only, in training and in evaluation.

What it changes: BERT's pooler and RoBERTa's head read the first token of the last block's output, and
everything after the last block's attention is position-wise, so from the block's residual output
module (BERT's SelfOutput) on, only that position is computed. Which models allow it is found out, not
assumed: a probe forward must give the same logits with and without the narrowing.
Invariant (tests/unit/test_first_position.py): the same logits for every method, the same gradients
(with gradient checkpointing too), and untouched models whose head reads another position. Measured
gain: docs/benchmarks.md, "Speed tricks re-measured" (benchmarks/speedups.py): it pays in fp32 only, so
speedups.applied enters it in fp32 runs and evals only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftcli.methods.base import find_blocks


def last_layer(model: nn.Module) -> nn.Module | None:
    """The last of the model's transformer blocks (methods.base.find_blocks, as layer freezing finds them)."""
    blocks = find_blocks(model)
    return model.get_submodule(blocks.path)[-1] if blocks is not None else None


def residual_output(layer: nn.Module) -> nn.Module | None:
    """The first module inside the block with a LayerNorm of its own: where BERT-style blocks add the
    attention's input back (SelfOutput). From there on every position is computed on its own."""
    for module in layer.modules():
        if module is not layer and any(isinstance(child, nn.LayerNorm) for child in module.children()):
            return module
    return None


def _first_position(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def first(value: Any) -> Any:
        return value[:, :1] if isinstance(value, torch.Tensor) and value.dim() == 3 else value

    return tuple(first(a) for a in args), {k: first(v) for k, v in kwargs.items()}


def is_narrowed(point: nn.Module) -> bool:
    """Whether `point` runs at the first position already: an eval inside a narrowed training loop
    finds its own hook there, and adds no second one."""
    return any(hook is _first_position for hook in point._forward_pre_hooks.values())


@contextmanager
def _narrowed(point: nn.Module) -> Iterator[None]:
    handle = point.register_forward_pre_hook(_first_position, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _same_logits(model: nn.Module, point: nn.Module, vocab_size: int) -> bool:
    """One small forward with and without the narrowing (eval mode, so dropout draws nothing)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits.float()
            with _narrowed(point):
                narrow = model(input_ids=ids, attention_mask=mask).logits.float()
    except IndexError:  # the head indexes a position the narrowing removed
        return False
    except torch.OutOfMemoryError:  # no verdict: the trick stays off, and the first step says what memory it needs
        return False
    finally:
        model.train(training)
    # fp32 only (applied.py leaves the trick off in 16 bits), so the two forwards agree to rounding.
    tolerance = 1e-4 * max(1.0, float(full.abs().max()))
    return narrow.shape == full.shape and bool((narrow - full).abs().max() <= tolerance)


@contextmanager
def first_position_only(model: nn.Module, inner: nn.Module, enabled: bool) -> Iterator[bool]:
    """Within the block, the last layer of `inner` (the unwrapped `model`) runs its residual output
    and feed-forward at the first position only, when `enabled` (the task reads one position) and the
    probe shows the logits unchanged. Yields whether it does."""
    layer = last_layer(inner) if enabled else None
    point = residual_output(layer) if layer is not None else None
    vocab_size = getattr(getattr(inner, "config", None), "vocab_size", None)
    if point is None or vocab_size is None:
        yield False
    elif is_narrowed(point):
        yield True
    elif not _same_logits(model, point, vocab_size):
        yield False
    else:
        with _narrowed(point):
            yield True
