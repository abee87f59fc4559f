"""What changes when accelerate shards the model (FSDP, DeepSpeed ZeRO-3): reading whole parameters.

Under those engines a process holds a slice of each parameter between steps, and a parameter read then
is empty or flat: saving it writes an empty adapter (a known failure of hand-written scripts). Inside
`full_parameters`, every process sees every parameter whole; the training loop calls the code that
saves adapters there.

Under DDP, each backward must give every trainable parameter a gradient, or the next step stops with
"Expected to have finished reduction in the prior iteration": `unused_parameters` finds the ones a
training step leaves out before `prepare`, and `allow_unused` tells DDP to look for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import nn
from torch.utils.data import DataLoader

from peftcli.errors import PeftcliError


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
    """Every trainable parameter whole, in its master precision, on every process for the duration;
    nothing written back. Only the trainable ones are gathered: the frozen base stays sharded (gathering
    it would need the whole model on every GPU, at every eval and save, which is what sharding avoids)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        with deepspeed_fp32_trainable(prepared):
            yield
        return
    if not sharded(accelerator):
        yield
        return
    with fsdp_full_parameters(prepared):
        yield


@contextmanager
def deepspeed_fp32_trainable(prepared: nn.Module) -> Iterator[None]:
    """DeepSpeed (any ZeRO stage) keeps the fp32 masters in its optimizer and 16-bit copies (ZeRO-3:
    partitions) in the model: each trainable parameter is replaced by its whole fp32 master for the
    duration. safe_get_full_fp32_param gathers across processes, so every process calls it, in order."""
    import deepspeed  # only present where a DeepSpeed config is used
    from deepspeed.utils import safe_get_full_fp32_param

    def whole(param: nn.Parameter) -> torch.Tensor:
        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # before the first step
            return param.detach().float().clone()

    with swapped_trainable(prepared, whole):
        yield


@contextmanager
def swapped_trainable(prepared: nn.Module, whole: Callable[[nn.Parameter], torch.Tensor]) -> Iterator[None]:
    """Each trainable parameter registered on its module is replaced by `whole(parameter)` (computed on
    every process, in the modules' order), then put back as it was."""
    made: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in prepared.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.requires_grad:
                    continue
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(whole(param), requires_grad=True)
                swapped.append((module, name, param))
                module._parameters[name] = made[id(param)]
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextmanager
def fsdp_full_parameters(prepared: nn.Module) -> Iterator[None]:
    """FSDP1 (a FullyShardedDataParallel root: every parameter, summoned) or FSDP2 (fully_shard
    modules: the trainable parameters, each whole in the dtype of its sharded master)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(prepared, FullyShardedDataParallel):  # FSDP1
        with FullyShardedDataParallel.summon_full_params(prepared, writeback=False, recurse=True):
            yield
        return
    # Resharded first: after a forward, a module whose parameters stayed gathered (the root, by
    # default) registers the unsharded compute copies, which mixed precision makes 16-bit.
    for module in prepared.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

    def whole(param: nn.Parameter) -> torch.Tensor:
        return param.full_tensor().detach() if isinstance(param, DTensor) else param.detach()

    with swapped_trainable(prepared, whole):
        yield


def configure_deepspeed(
    accelerator: Accelerator, batch_size: int, grad_accum: int, max_grad_norm: float | None
) -> None:
    """The recipe's micro-batch, accumulation and clipping, written into DeepSpeed's config before
    `prepare`. accelerate fills `auto` values from the loader's batch_size, which a loader built on a
    batch sampler (ours: length-grouped steps) does not have, so `prepare` stopped there; and DeepSpeed
    clips gradients itself, so the recipe's max_grad_norm must reach it."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = batch_size * grad_accum * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0


def backward_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    """DeepSpeed divides each loss by its accumulation steps unless told not to; peftcli's loss is
    already its share of the step's (as HF Trainer, which passes the same flag)."""
    return {"scale_wrt_gas": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}


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


def gather_to_main(accelerator: Accelerator, value: Any) -> list[Any]:
    """Every process's `value` (any picklable object) on the main process, in process order; an empty
    list on the others. What the other processes would write goes to the main process this way."""
    if accelerator.num_processes == 1:
        return [value]
    gathered: list[Any] | None = [None] * accelerator.num_processes if accelerator.is_main_process else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered or []


def all_ok(accelerator: Accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process: a step that failed on one (a full disk, a lock taken by
    another run) fails on all, instead of leaving the others waiting at the next collective."""
    if accelerator.num_processes == 1:
        return ok
    failed = accelerator.reduce(torch.tensor([0 if ok else 1], device=accelerator.device), reduction="sum")
    return int(failed.item()) == 0


def on_main(accelerator: Accelerator, action: Callable[[], None]) -> None:
    """Runs `action` on the main process only (the run directory's one writer). Whatever it raises
    there stops every process: the main one raises it, the others a PeftcliError the CLI does not
    print twice; none is left waiting at a collective for a peer that left."""
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
            error = exc
    if not all_ok(accelerator, error is None):
        if error is not None:
            raise error
        raise PeftcliError("the main process stopped the run")


def data_parallel(accelerator: Accelerator) -> bool:
    """True when `prepare` wraps the model in DistributedDataParallel (several processes, each with the
    whole model): accelerate does so for its MULTI_* types."""
    return accelerator.num_processes > 1 and (
        accelerator.multi_device or accelerator.distributed_type == DistributedType.MULTI_CPU
    )


def first_batch(loader: DataLoader) -> dict[str, torch.Tensor]:
    """The loader's first micro-batch, the loader left as it was: starting an iterator draws a seed from
    the loader's generator (the global one where it has none), and a resumed run's data order and
    generators must not depend on whether this was called."""
    generator = loader.generator
    state = generator.get_state() if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(loader))
    if generator is not None and state is not None:
        generator.set_state(state)
    return batch


def unused_parameters(
    model: nn.Module, batch: dict[str, torch.Tensor], loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
) -> list[str]:
    """The trainable parameters that a training forward and backward of `batch` leave without a gradient
    (bert2bert's encoder pooler, which EncoderDecoderModel never calls, when `all-linear` adapts it).

    Found by running the step, not by listing modules: whether a module takes part depends on the model
    class and the task. The model is left as it was found: in its mode, with its buffers' values (a
    BatchNorm's running statistics), no gradients, and the random generators untouched (dropout draws
    here would shift every later step's). A parameter used by some batches only is not found; DDP then
    still stops, with that parameter's name under TORCH_DISTRIBUTED_DEBUG=DETAIL.

    Args:
        model: the model before `prepare`, on the device it trains on.
        batch: a micro-batch as the training loop gets it (moved to the model's device here).
        loss: the training loss of `model` on a batch.

    Returns:
        The unused trainable parameters' names, in the model's order.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        return []
    device = next(iter(trainable.values())).device
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    was_training = model.training
    for p in trainable.values():
        p.grad = None  # a gradient left from before would count as used
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            loss(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).backward()
        return [n for n, p in trainable.items() if p.grad is None]
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
        for p in trainable.values():
            p.grad = None


def allow_unused(accelerator: Accelerator, unused: list[str]) -> None:
    """Before `prepare`: when a trainable parameter gets no gradient on some process, DDP finds such
    parameters at each step (`find_unused_parameters`, one walk of the autograd graph per forward); else
    nothing changes. Every process decides the same way, whatever it found."""
    if all_ok(accelerator, not unused):
        return
    handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
    handler.find_unused_parameters = True
    accelerator.ddp_handler = handler
