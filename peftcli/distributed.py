"""What changes when accelerate shards the model (FSDP, DeepSpeed ZeRO-3): reading whole parameters.

Under those engines a process holds a slice of each parameter between steps, and a parameter read then
is empty or flat: saving it writes an empty adapter (a known failure of hand-written scripts). Inside
`full_parameters`, every process sees every parameter whole; the training loop calls the code that
saves adapters there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


def sharded(accelerator: Accelerator) -> bool:
    """True when parameters (and the optimizer) are split across processes."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3  # type: ignore[union-attr]
    return False


def partitioned_optimizer(accelerator: Accelerator) -> bool:
    """True when each process holds only its part of the optimizer state (FSDP, any ZeRO stage)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextmanager
def full_parameters(accelerator: Accelerator, prepared: nn.Module) -> Iterator[None]:
    """Every parameter whole on every process for the duration; nothing written back."""
    if not sharded(accelerator):
        yield
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed  # only present where a DeepSpeed config is used

        trainable = [p for p in prepared.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            yield
        return
    with fsdp_full_parameters(prepared):
        yield


@contextmanager
def fsdp_full_parameters(prepared: nn.Module) -> Iterator[None]:
    """FSDP1 (a FullyShardedDataParallel root) or FSDP2 (fully_shard modules): every parameter whole."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(prepared, FullyShardedDataParallel):  # FSDP1
        with FullyShardedDataParallel.summon_full_params(prepared, writeback=False, recurse=True):
            yield
        return
    fsdp2 = [m for m in prepared.modules() if isinstance(m, FSDPModule)]
    for module in fsdp2:
        module.unshard()
    try:
        yield
    finally:
        for module in fsdp2:
            module.reshard()


@contextmanager
def accumulating(accelerator: Accelerator, prepared: nn.Module, last: bool) -> Iterator[None]:
    """One micro-batch of an accumulation window: gradients are synced across processes on the last
    one only. DDP and FSDP skip the all-reduce under `no_sync`; DeepSpeed's engine needs to be told
    which backward ends the window, because it steps itself there (accelerate's optimizer.step is a
    no-op under DeepSpeed)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
        return
    if last:
        yield
        return
    with accelerator.no_sync(prepared):
        yield


def gather_uneven(accelerator: Accelerator, local: torch.Tensor) -> torch.Tensor:
    """All processes' rows of `local` (dim 0), whatever each holds: no padding rows, no duplicates."""
    if accelerator.num_processes == 1:
        return local
    sizes = accelerator.gather(torch.tensor([local.shape[0]], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(local.to(accelerator.device), dim=0)
    rows = accelerator.gather(padded).view(accelerator.num_processes, -1, *local.shape[1:])
    return torch.cat([rows[i, :n] for i, n in enumerate(sizes)]).cpu()


def all_ok(accelerator: Accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process: a step that failed on one (a full disk, a lock taken by
    another run) fails on all, instead of leaving the others waiting at the next collective."""
    if accelerator.num_processes == 1:
        return ok
    failed = accelerator.reduce(torch.tensor([0 if ok else 1], device=accelerator.device), reduction="sum")
    return int(failed.item()) == 0
