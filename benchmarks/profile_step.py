"""Where a `peft train` step's time goes: torch.profiler around a few optimizer steps of a real run.

    python benchmarks/profile_step.py RECIPE [KEY=VALUE ...] [--skip 15] [--steps 10] [--top 30]

The recipe runs through `peft train` as a user runs it; steps `skip+1 .. skip+steps` are recorded
and the operators are printed by their own CPU time (the first steps warm up the allocator and the
kernels' caches, so they are left out). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from peftcli.training import loop as trainer
from peftcli.training.run import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--skip", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="self_cpu_time_total")
    args = parser.parse_args()

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
    step_function = trainer.train_step
    calls = 0

    def profiled(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == args.skip + 1:
            profiler.start()
        result = step_function(*a, **kw)
        if calls == args.skip + args.steps:
            profiler.stop()
        return result

    trainer.train_step = profiled
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"output_dir={tmp}/run", f"train.max_steps={args.skip + args.steps}"]
        run_train(args.recipe, overrides, overwrite=True)
    print(profiler.key_averages().table(sort_by=args.sort, row_limit=args.top))


if __name__ == "__main__":
    main()
