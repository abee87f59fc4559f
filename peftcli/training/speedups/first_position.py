"""Sequence classification reads the last layer at one position only (BERT's pooler and RoBERTa's head
take the first token), so the last layer's attention output and feed-forward block run at that
position only: about a seventh of MiniLM's matrix products, in training and in evaluation.

Which models allow it is found out, not assumed: the last layer must have a residual output module
(BERT's `forward(hidden_states, input_tensor)`), and a probe forward must give the same logits with
and without the narrowing. Everything after the last attention is position-wise, so the logits are
the same sums; the gradients too, since no other position of the last layer reaches the loss.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Residual output modules narrowed now: evaluate() inside a training loop finds theirs already narrowed.
_NARROWED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def last_layer(model: nn.Module) -> nn.Module | None:
    """The last block of the model's longest stack of identical layers (its transformer layers)."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    stacks = [s for s in stacks if len({type(layer) for layer in s}) == 1]
    return max(stacks, key=len)[-1] if stacks else None


def residual_output(layer: nn.Module) -> nn.Module | None:
    """The layer's first module that adds its input back after the attention (BERT's SelfOutput):
    from there on, every position is computed on its own."""
    for module in layer.modules():
        params = list(inspect.signature(module.forward).parameters)
        if params[:2] == ["hidden_states", "input_tensor"]:
            return module
    return None


def _first_position(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def first(value: Any) -> Any:
        return value[:, :1] if isinstance(value, torch.Tensor) and value.dim() == 3 else value

    return tuple(first(a) for a in args), {k: first(v) for k, v in kwargs.items()}


@contextmanager
def _narrowed(point: nn.Module) -> Iterator[None]:
    handle = point.register_forward_pre_hook(_first_position, with_kwargs=True)
    _NARROWED.add(point)
    try:
        yield
    finally:
        handle.remove()
        _NARROWED.discard(point)


def _same_logits(model: nn.Module, point: nn.Module, vocab_size: int, low_precision: bool = False) -> bool:
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
    except (RuntimeError, IndexError, ValueError):  # the head reads a position the narrowing removed
        return False
    finally:
        model.train(training)
    # 16-bit arithmetic (16-bit weights, or autocast over fp32 weights) rounds the two forwards apart.
    half = low_precision or any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    tolerance = (2e-2 if half else 1e-4) * max(1.0, float(full.abs().max()))
    return narrow.shape == full.shape and bool((narrow - full).abs().max() <= tolerance)


@contextmanager
def first_position_only(
    model: nn.Module, inner: nn.Module, enabled: bool, low_precision: bool = False
) -> Iterator[bool]:
    """Within the block, the last layer of `inner` (the unwrapped `model`) runs its residual output
    and feed-forward at the first position only, when `enabled` (the task reads one position) and the
    probe shows the logits unchanged. Yields whether it does."""
    layer = last_layer(inner) if enabled else None
    point = residual_output(layer) if layer is not None else None
    vocab_size = getattr(getattr(inner, "config", None), "vocab_size", None)
    if point is None or vocab_size is None:
        yield False
    elif point in _NARROWED:
        yield True
    elif not _same_logits(model, point, vocab_size, low_precision):
        yield False
    else:
        with _narrowed(point):
            yield True
