"""Where runs that overlap train (`peft sweep --parallel N`): a GPU each when there are GPUs, else an
equal share of the CPU cores. A `Slot` is what a run's process takes before it touches a device: the
environment (CUDA_VISIBLE_DEVICES naming its GPU), torch's number of CPU threads, and the file its
output goes to, since several runs cannot share one terminal legibly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Slot:
    """env: set before anything touches a device; threads: torch's CPU threads (None: its default);
    log: where the run's stdout and stderr go (None: the terminal)."""

    env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    log: Path | None = None

    def with_log(self, log: Path) -> Slot:
        return Slot(self.env, self.threads, log)

    def describe(self) -> str:
        where = f"GPU {self.env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in self.env else "the CPU"
        return f"{where}, {self.threads} CPU thread{'s' if self.threads != 1 else ''}" if self.threads else where


def plan_slots(parallel: int, cores: int, gpus: list[str]) -> tuple[list[Slot], list[str]]:
    """`parallel` slots on a machine with `cores` CPU cores and the visible `gpus` (their
    CUDA_VISIBLE_DEVICES names; empty for none), or the problems saying why not. One run: the
    process's defaults. Several: one GPU each, or cores // parallel threads each on a CPU, so that
    together they use the cores once (torch's default would give each run every core)."""
    if parallel <= 1:
        return [Slot()], []
    threads = max(1, cores // parallel)
    if gpus:
        if parallel > len(gpus):
            return [], [
                (
                    f"--parallel {parallel}: {len(gpus)} GPU{'s' if len(gpus) != 1 else ''} visible "
                    f"({', '.join(gpus)}), and a run trains on one. Use --parallel {len(gpus)} or less."
                )
            ]
        return [Slot({"CUDA_VISIBLE_DEVICES": gpu}, threads) for gpu in gpus[:parallel]], []
    if parallel > cores:
        return [], [
            (
                f"--parallel {parallel}: this machine has {cores} CPU core{'s' if cores != 1 else ''} and no GPU, "
                f"and a run needs a core at least. Use --parallel {cores} or less."
            )
        ]
    return [Slot({}, threads) for _ in range(parallel)], []


def machine_slots(parallel: int) -> tuple[list[Slot], list[str]]:
    """plan_slots on this machine: the cores this process may run on, and the GPUs torch sees."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return plan_slots(parallel, cores, visible_gpus() if parallel > 1 else [])


def visible_gpus() -> list[str]:
    """The GPUs a child may be given, by the names CUDA_VISIBLE_DEVICES already uses (indices or UUIDs)."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[: torch.cuda.device_count()] if named else [str(i) for i in range(torch.cuda.device_count())]
