"""A linear layer's product with a sparse change to its weights, W + scatter(I, d): the forward and
backward that train only the entries I (selective fine-tuning), without a dense copy per layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def with_delta(tensor: torch.Tensor, indices: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor:
    """A copy of `tensor` with `delta` added at the flat `indices` (the sum taken in float32)."""
    if delta is None:
        return tensor
    flat = tensor.detach().reshape(-1).clone()
    flat[indices] = (flat[indices].to(delta.dtype) + delta.detach()).to(tensor.dtype)
    return flat.view_as(tensor)


class SparseDeltaLinear(torch.autograd.Function):
    """y = x (W + scatter(I, d))^T + (b + scatter(J, e)), with gradients for x, d and e only.

    Written out (not left to autograd) so that the full effective weight is rebuilt in backward instead
    of being kept per layer until then: autograd would hold a weight-sized copy per adapted layer.
    The gradient of d is the dense weight gradient (the same matmul full fine-tuning does) read at I.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, w_idx, w_delta, b_idx, b_delta, transposed: bool):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, weight, w_idx, w_delta, b_idx, b_delta)
        ctx.transposed = transposed
        w = with_delta(weight, w_idx, w_delta)
        b = with_delta(bias, b_idx, b_delta) if bias is not None else None
        if transposed:  # GPT-2's Conv1D: y = x W + b with W (in x out), computed as Conv1D does
            out = torch.addmm(b, x.reshape(-1, x.size(-1)), w) if b is not None else x.reshape(-1, x.size(-1)) @ w
            return out.view(*x.shape[:-1], w.shape[1])
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        x, weight, w_idx, w_delta, b_idx, b_delta = ctx.saved_tensors
        # Under autocast the forward ran in low precision; backward runs outside autocast, so the
        # matmuls are done in the gradient's dtype, as autocast's own backward would.
        dtype = grad.dtype
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = with_delta(weight, w_idx, w_delta).to(dtype)
            grad_x = (grad @ (w.T if ctx.transposed else w)).to(x.dtype)
        if w_delta is not None and ctx.needs_input_grad[4]:
            xs = x.reshape(-1, x.shape[-1]).to(dtype)
            dense = xs.T @ g if ctx.transposed else g.T @ xs
            grad_w = dense.reshape(-1)[w_idx].to(w_delta.dtype)
        if b_delta is not None and ctx.needs_input_grad[6]:
            grad_b = g.sum(0)[b_idx].to(b_delta.dtype)
        return grad_x, None, None, None, grad_w, None, grad_b, None
