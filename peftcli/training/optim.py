"""The optimizer, its parameter groups (weight decay, LoRA+) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from peftcli.config.schema import OptimizerSpec, ScheduleSpec
from peftcli.errors import PeftcliError

MIN_8BIT_SIZE = 4096  # bitsandbytes' 8-bit AdamWs keep fp32 moments for tensors with fewer values (its default)


def runs_as(spec: OptimizerSpec, on_cuda: bool) -> str:
    """The optimizer a run builds for `spec`: bitsandbytes pages optimizer state on CUDA only; elsewhere its
    paged AdamW warns at the first step and runs as its plain 8-bit AdamW (the same updates and state), so
    a run off CUDA takes that one at once."""
    return "adamw8bit" if spec.name == "paged_adamw8bit" and not on_cuda else spec.name


def make_optimizer(model: nn.Module, spec: OptimizerSpec, on_cuda: bool = False) -> torch.optim.Optimizer:
    """`on_cuda`: the run trains on a GPU (see `runs_as`)."""
    groups = parameter_groups(model, spec)
    name = runs_as(spec, on_cuda)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    if name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb  # an optional extra; recipe validation checked it is installed

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, min_8bit_size=MIN_8BIT_SIZE)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)


def parameter_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, in the same order on every run (a resumed optimizer's state
    maps onto them by position). As in HF Trainer: no weight decay on biases and norm weights (1-D
    tensors). LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354, `loraplus_lr_ratio`): LoRA's
    B matrices and the 1-D tensors train at lr x ratio, the groups HF peft's create_loraplus_optimizer
    makes (LoRA on embeddings, its third group, is not one peftcli offers)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise PeftcliError("method: no parameter is trainable; the method adapted nothing.")
    ratio = spec.loraplus_lr_ratio
    if ratio is not None and not any("lora_B" in n for n, _ in named):
        raise PeftcliError(
            f"optimizer.loraplus_lr_ratio: scales the learning rate of LoRA's B matrices, and this method trains "
            f"none (got {ratio:g}). Use method lora or adalora, or remove optimizer.loraplus_lr_ratio."
        )

    def faster(name: str, p: torch.Tensor) -> bool:
        return ratio is not None and ("lora_B" in name or p.ndim == 1)

    groups = []
    for fast in (False, True):
        lr = {"lr": spec.lr * ratio} if fast and ratio is not None else {}
        matrices = [p for n, p in named if p.ndim > 1 and faster(n, p) == fast]
        vectors = [p for n, p in named if p.ndim <= 1 and faster(n, p) == fast]
        groups += [
            {"params": matrices, "weight_decay": spec.weight_decay, **lr},
            {"params": vectors, "weight_decay": 0.0, **lr},
        ]
    return [g for g in groups if g["params"]]


def make_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int) -> Any:
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil((spec.warmup_ratio or 0.0) * total_steps)
    name = "constant_with_warmup" if spec.name == "constant" else spec.name
    return get_scheduler(name, optimizer, num_warmup_steps=min(warmup, total_steps), num_training_steps=total_steps)
