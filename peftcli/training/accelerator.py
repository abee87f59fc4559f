"""The run's accelerate `Accelerator`, refused early where the precision or engine asked for cannot run
here, and the fp32 master weights mixed precision trains."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn

from peftcli.config.hardware import bf16_runs_here
from peftcli.config.schema import TrainSpec
from peftcli.errors import PeftcliError
from peftcli.training import precision


def make_accelerator(spec: TrainSpec, trackers: list[Any] | None = None) -> Accelerator:
    """`trackers`: experiment trackers for `log_with` (peftcli.reporting.trackers), made but not started."""
    mixed_precision, _ = precision.resolve(spec.mixed_precision)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PeftcliError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is visible (got 'fp16'). "
            "Use auto, bf16 (CPUs with bf16 support) or no."
        )
    if mixed_precision == "bf16" and not torch.cuda.is_available() and not bf16_runs_here():
        raise PeftcliError(
            "train.mixed_precision: this CPU has no bfloat16 support and no CUDA GPU is visible (got 'bf16'). "
            "Use auto or no."
        )
    for engine, config in (("FSDP", "configs/fsdp.yaml"), ("DEEPSPEED", "configs/deepspeed-zero*.yaml")):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true") and not torch.cuda.is_available():
            raise PeftcliError(
                f"accelerate launch: {config} shards the model across GPUs and none is visible (got "
                f"ACCELERATE_USE_{engine}=true). On CPUs use configs/cpu-ddp.yaml or --num-processes N."
            )
    precision.set_tf32(spec.tf32)
    # accelerate keeps one state per process and refuses another precision once it is set: a second
    # run in the same process (the Python API, tests) starts from a fresh state. The process group stays.
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()
    # Several processes and no GPU: DDP on the CPUs over gloo (accelerate picks that only when told cpu=True).
    on_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpus, log_with=trackers or None)


def fp32_masters(model: nn.Module, accelerator: Accelerator) -> None:
    """Under autocast every trainable tensor is fp32, whatever `model.dtype` is: a classification
    head, BitFit's biases or full fine-tuning's weights left in fp16 would lose small updates to
    rounding, and the fp16 grad scaler refuses to unscale fp16 gradients ("Attempting to unscale FP16
    gradients"). Autocast computes in 16 bits all the same. DeepSpeed keeps its own fp32 masters."""
    if accelerator.mixed_precision not in ("fp16", "bf16") or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
