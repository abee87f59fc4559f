"""The layer LoRA and AdaLoRA share: a frozen base plus a low-rank update, folded into the base
weights when merged."""

from __future__ import annotations

import torch
from torch import nn

from peftcli.methods._layers import WrappedLayer


class LowRankLayer(WrappedLayer):
    """A wrapped linear layer that adds `update()`, an (out, in) matrix, to its base weight; a DoRA
    layer also rescales each output row by its `lora_magnitude_vector`."""

    def update(self) -> torch.Tensor:
        """The (out, in) update the layer adds to the base weight (scaled, in float32)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """update() in the base weight's layout (transposed for Conv1D)."""
        return self.oriented(self.update())

    def merged(self) -> nn.Module:
        """The base layer with the update folded in: W + delta, times m / ||W + delta|| per row for
        DoRA."""
        w = self.base_layer.weight
        magnitude = getattr(self, "lora_magnitude_vector", None)
        if magnitude is None:
            w.data += self.delta_weight().to(w.dtype)
            return self.base_layer
        with torch.no_grad():
            full = w.float() + self.delta_weight()
            dim = 0 if self.fan_in_fan_out else 1  # the input dimension: Conv1D stores (in, out)
            factor = magnitude.float() / torch.linalg.norm(full, dim=dim)
            w.data = (full * (factor if self.fan_in_fan_out else factor[:, None])).to(w.dtype)
        return self.base_layer
