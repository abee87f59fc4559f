"""Freed tensor memory goes back to the operating system (Linux, glibc), so a CPU run's peak resident
memory is what its tensors need, not what glibc's heap has kept.

glibc's malloc serves a large block with its own mmap, and returns it to the OS when freed; but the
first time such a block is freed it raises that threshold to the block's size (up to 32 MiB on 64-bit
Linux), so from then on every tensor below it comes from the heap. A training step allocates and frees
hundreds of such tensors in a different order each time, the heap fragments, and glibc gives back only
its free top. On SmolLM2-135M with a 4-bit base and gradient checkpointing (8 x 512 tokens) that left
the process at twice what it needed (docs/benchmarks.md, "Host memory"). A fixed threshold
(mallopt M_MMAP_THRESHOLD) keeps large tensors on their own mappings and turns the dynamic rise off.

What changes: where the C library puts blocks of 128 KiB and more; never a value computed.
The cost: every such block is a fresh mapping whose pages are zero-filled on first touch, so steps are
slower (measured in docs/benchmarks.md, "Host memory": about 0.5x on SmolLM2, 0.6-0.7x on the
quickstart). Hence a lever the recipe turns on (`train.return_freed_memory: true`), for a CPU run short
of memory, not a default. Not applied where the user tuned malloc already (any MALLOC_* variable, or
GLIBC_TUNABLES), where the C library is not glibc (musl, macOS, Windows), or twice.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 128 * 1024  # glibc's own default before the dynamic rise


def user_tuned() -> bool:
    """Whether the environment already tells glibc's malloc what to do (mallopt would override it)."""
    return "GLIBC_TUNABLES" in os.environ or any(key.startswith("MALLOC_") for key in os.environ)


def glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has no such symbol
    except (OSError, AttributeError):
        return None
    return libc


@cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process (once); True when it is set here."""
    if user_tuned():
        return False
    libc = glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
