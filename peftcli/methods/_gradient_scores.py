"""Scores for the entries of a model's weights from calibration gradients, and the top k of them
(as one selection on every process): how gradient-based selection (FISH mask) picks what to train."""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftcli.errors import MethodError
from peftcli.methods.base import Calibration


def score_entries(
    model: nn.Module, tensors: dict[str, torch.Tensor], calibration: Calibration, batches: int, score: str
) -> dict[str, torch.Tensor]:
    """Per-entry scores summed over the batches. Each tensor's gradient is folded into its score as
    soon as it is computed and then dropped, so at most one gradient is alive besides the scores.
    Every parameter's requires_grad is restored afterwards, and the weights are only read."""
    scores = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in tensors.items()}
    flags = {p: p.requires_grad for p in model.parameters()}

    def accumulate(name: str) -> Any:
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            scores[name] += g.square() if score == "fisher" else g.abs()
            p.grad = None

        return hook

    for p in flags:
        p.requires_grad_(False)
    handles = []
    try:
        for name, t in tensors.items():
            t.requires_grad_(True)
            handles.append(t.register_post_accumulate_grad_hook(accumulate(name)))
        used = 0
        for batch in islice(calibration.batches, batches):
            calibration.loss(model, batch).backward()
            used += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    if used == 0:
        raise MethodError("selective: calibration got no training batches to score the weights with. Check data.train.")
    return scores


def top_entries(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest-scoring entries across all tensors, as sorted flat indices per tensor; with several
    processes, those of the main process (`from_main_process`)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    top = from_main_process(torch.topk(flat, k, sorted=False).indices.sort().values)
    del flat
    out, start = {}, 0
    for name, s in scores.items():
        lo, hi = torch.searchsorted(top, torch.tensor([start, start + s.numel()], device=top.device)).tolist()
        out[name] = (top[lo:hi] - start).cpu()
        start += s.numel()
    return out


def from_main_process(indices: torch.Tensor) -> torch.Tensor:
    """`indices` as the main process (rank 0) holds them, on every process where torch.distributed runs.
    Each process scores the batches it is given and may rank the entries differently, and DDP's average
    of a delta's gradients means something only where every process's delta holds the same entries.
    Every process has the same k, so the shapes agree."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(indices, src=0)
    return indices
