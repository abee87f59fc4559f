"""Run by torchrun with 2 CPU processes (gloo) from test_distributed.py: a LoRA model sharded with
FSDP2, one training step, then the adapter saved inside and outside `fsdp_full_parameters`.

argv: OUT_DIR. Rank 0 writes OUT_DIR/inside (the adapter) and OUT_DIR/outside.txt (the error saving
while sharded), and OUT_DIR/reference.safetensors (the same step without FSDP, one process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from peftcli.errors import CheckpointError
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_state, save_adapter
from peftcli.training.distributed import fsdp_full_parameters
from tests.conftest import make_tokenizer, tiny_model
from tests.helpers import adapt, randomize_trainable


def lora_model() -> torch.nn.Module:
    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], "sequence_classification")
    torch.manual_seed(1)
    randomize_trainable(model)
    return model


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokens = make_tokenizer()(
        ["good film good", "bad book bad", "great show", "dull meal"], padding=True, return_tensors="pt"
    )
    batch = dict(tokens) | {"labels": torch.tensor([0, 1, 0, 1])}
    model = lora_model()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    step(model, batch)  # both processes see the same batch: the step equals one process's
    try:
        state = adapter_state(model)
        save_adapter(out / "outside", state, {"peft_type": "LORA"}) if rank == 0 else None
        outside = "saved"
    except (CheckpointError, RuntimeError, ValueError, AttributeError) as exc:
        outside = f"{type(exc).__name__}: {exc}"
    with fsdp_full_parameters(model):
        state = adapter_state(model)
    if rank == 0:
        save_adapter(out / "inside", state, {"peft_type": "LORA"})
        (out / "outside.txt").write_text(outside)
        reference = lora_model()
        step(reference, batch)
        save_file(adapter_state(reference), str(out / "reference.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Everything is written and the group closed; leave without the interpreter's teardown, in which
    # gloo's threads sometimes abort ("terminate called without an active exception", SIGABRT, seen
    # once in a full suite run) and fail a run whose files are all there.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
