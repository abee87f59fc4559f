"""`peft train RECIPE --num-processes N`: the same run under `accelerate launch` with N processes.

A convenience over `accelerate launch -m peftcli train ...`: the recipe is checked here first, so a
mistake is reported once (not once per process) with exit code 2, then torchrun (accelerate's
multi-process launcher) starts the processes: DDP over NCCL on GPUs, over gloo on CPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peftcli.config.load import load_recipe
from peftcli.errors import PeftcliError
from peftcli.training.run_dir import check_run_dir, kept_paths


def launch_command(recipe_path: Path, overrides: list[str], num_processes: int, flags: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet",
        "-m", "peftcli", "train", str(recipe_path), *overrides, *flags,
    ]  # fmt: skip


def run_launch(
    recipe_path: Path, overrides: list[str], num_processes: int, overwrite: bool, resume: str | None, debug: bool
) -> int:
    if "WORLD_SIZE" in os.environ:
        raise PeftcliError(
            "--num-processes: this process was itself started by a launcher (WORLD_SIZE is set). Drop --num-processes."
        )
    recipe = load_recipe(recipe_path, overrides)
    if resume is None:
        check_run_dir(recipe.run_dir(), overwrite, kept_paths(recipe, recipe_path))
    flags = ["--overwrite"] * overwrite + (["--resume", resume] if resume else []) + ["--debug"] * debug
    process = subprocess.Popen(launch_command(recipe_path, overrides, num_processes, flags))
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches the processes too; they save and exit
            continue
