"""Which scaled-dot-product attention kernel is faster on this CPU: forward + backward (training)
and forward alone (eval), math against flash, fp32 and bf16, at the shapes peftcli trains.

    python benchmarks/attention_kernels.py

Prints one JSON line per shape and dtype with the median milliseconds of each kernel. The crossover
it finds for bf16 training is `peftcli.training.speedups.attention_kernel.MATH_ATTENTION_BELOW`.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, heads, length, head dim, causal): MiniLM on SST-2 lengths, then SmolLM2-135M up to 512.
SHAPES = [(32, 12, 24, 32, False), (32, 12, 64, 32, False), (32, 12, 128, 32, False), (8, 9, 128, 64, True),
          (8, 9, 192, 64, True), (8, 9, 256, 64, True), (8, 9, 512, 64, True)]  # fmt: skip
KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def median_ms(shape: tuple[int, int, int, int, bool], dtype: torch.dtype, kernel: SDPBackend, backward: bool) -> float:
    b, h, length, d, causal = shape
    q, k, v = (torch.randn(b, h, length, d, dtype=dtype, requires_grad=backward) for _ in range(3))
    mask = None
    if not causal:  # padded batch: the last 3 positions are padding
        mask = torch.ones(b, 1, length, length, dtype=torch.bool)
        mask[..., length - 3 :] = False
    times = []
    for _ in range(7):
        started = time.perf_counter()
        with sdpa_kernel(kernel), torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            if backward:
                out.sum().backward()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times[2:]) * 1000, 2)


def main() -> None:
    torch.manual_seed(0)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (True, False):
                ms = {name: median_ms(shape, dtype, kernel, backward) for name, kernel in KERNELS.items()}
                row = {"shape_bhld_causal": shape, "dtype": str(dtype).removeprefix("torch."), "backward": backward}
                print(json.dumps(row | {"ms": ms, "faster": min(ms, key=ms.__getitem__)}), flush=True)


if __name__ == "__main__":
    main()
