"""What `train.mixed_precision: auto` picks, and TF32: decided from the hardware, never assumed.

- CUDA: bf16 where the GPU runs it (Ampere and newer), else fp16 with a grad scaler.
- CPU: bf16 where the cores run it natively (AMX or AVX512-BF16, read from the CPU's flags); elsewhere
  torch emulates bf16 and it is slower than fp32, so fp32 ("no"). docs/benchmarks.md has the numbers.

TF32 (`train.tf32`, on by default) lets CUDA run fp32 matrix products on the tensor cores with a
10-bit mantissa, as PyTorch did by default until 1.12; it changes nothing on CPUs or under bf16/fp16
autocast, whose products are 16-bit already.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve(requested: str) -> tuple[str, str]:
    """`train.mixed_precision` as accelerate takes it ("no", "fp16", "bf16"), and why, for `auto`."""
    if requested != "auto":
        return requested, "as the recipe asks"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name()} runs bf16"
        return "fp16", f"{torch.cuda.get_device_name()} has no bf16: fp16 with a grad scaler"
    native = sorted(flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags())
    if native:
        return "bf16", f"the CPU runs bf16 natively ({', '.join(native)})"
    return "no", "the CPU has no native bf16 (no AMX or AVX512-BF16): fp32"


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matrix products and convolutions on CUDA (no effect elsewhere)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def low_precision(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether the forward computes in 16 bits: 16-bit weights, or autocast (whose weights stay fp32)."""
    return accelerator.mixed_precision in ("fp16", "bf16") or any(
        p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
    )
