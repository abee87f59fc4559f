"""Run by torchrun with 2 CPU processes (gloo) from test_ddp_gloo.py: selective FT calibrated on
different batches on each process, as a launch that gives each process its own data would.

argv: OUT_DIR. Each process writes OUT_DIR/rank-<r>.safetensors: the flat indices it selected per tensor."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from peftcli.methods import METHODS, context_for
from peftcli.methods.base import Calibration
from peftcli.methods.selective import SelectiveLinear
from peftcli.tasks.registry import TASKS
from tests.conftest import tiny_model
from tests.helpers import mean_loss, random_batches

TASK = "sequence_classification"


def selective_model(data_seed: int) -> torch.nn.Module:
    """A tiny BERT classifier with selective FT, calibrated on random batches drawn with `data_seed`."""
    model = tiny_model("bert-cls")
    method = METHODS["selective"]
    params = method.params(name="selective", fraction=0.01, calibration_batches=4)
    adapted = method.apply(model, params, context_for(model, TASKS[TASK].head_modules))
    assert method.calibrate is not None
    batches = random_batches(model, TASK, seed=data_seed)
    method.calibrate(model, params, adapted, Calibration(iter(batches), mean_loss(TASK)))
    return model


def selected(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The selected flat indices of each adapted weight."""
    return {
        f"{name}.weight": module.weight_indices.clone()
        for name, module in model.named_modules()
        if isinstance(module, SelectiveLinear) and module.weight_indices is not None
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    save_file(selected(selective_model(data_seed=rank)), str(out / f"rank-{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Written and closed: leave without the interpreter's teardown, in which gloo's threads sometimes
    # abort (see fsdp2_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
