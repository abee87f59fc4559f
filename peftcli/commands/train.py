"""`peft train RECIPE [key=value ...]`: train an adapter from a recipe into its run directory.

    peft train recipes/lora-sst2.yaml
    peft train recipes/lora-sst2.yaml method.rank=16 train.max_steps=50
    peft train recipes/lora-sst2.yaml --resume

`--dry-run` (commands/dry_run.py) and `--num-processes N` (commands/launch.py) are commands of their
own; the run itself, from loading to the summary it prints, is peftcli.training.run's.
"""

from __future__ import annotations

from pathlib import Path

from peftcli.training.run import run_train


def run_train_command(recipe: Path, overrides: list[str], overwrite: bool = False, resume: str | None = None) -> Path:
    """Trains the recipe (load, build, train, end), printing its progress and then its summary, and
    returns the run directory.

    Raises:
        PeftcliError: the recipe, the run directory, the data or the model refused, or the run failed
            or was stopped (it says where it saved and how to resume).
    """
    return run_train(recipe, overrides, overwrite=overwrite, resume=resume)
