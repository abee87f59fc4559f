"""What a base layer is, whatever its class: facts several methods and the model loader need, each
worked out here once."""

from __future__ import annotations

import torch
from torch import nn


def dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """A bitsandbytes layer's weight as the float32 (out, in) matrix it computes with; None for any
    other layer (its weight is already a float tensor)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype.is_floating_point:
        return None  # bitsandbytes is an optional extra: not imported for a float model
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    if isinstance(layer, bnb.nn.Linear4bit):
        weight = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        # Row scales: on the weight until the first product moves them to the layer's state.
        scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
        weight = layer.weight.data.float() * scb.float().unsqueeze(1) / 127
    else:
        return None
    return weight.reshape(layer.out_features, layer.in_features)
