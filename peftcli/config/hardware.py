"""Whether this machine runs bfloat16 at all: a CUDA GPU with bf16, or a CPU that oneDNN runs it on.

"At all" includes CPUs that emulate bf16 (slower than fp32): what a recipe may ask for. Whether the CPU
runs it natively, which is what `train.mixed_precision: auto` picks by, is training.precision's question.
"""

from __future__ import annotations


def bf16_runs_here() -> bool:
    # Imported here, as before the split: config/'s own modules need no torch at import, ready for a
    # torch-free `peft validate` once methods/ and tasks/ get there (tests/cli/test_help_and_startup.py).
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
