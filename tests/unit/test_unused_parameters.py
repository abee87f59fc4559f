"""The probe DDP needs before `prepare` (distributed.unused_parameters): which trainable parameters a
training step leaves without a gradient, found without changing the run (generators, gradients,
buffers, mode, the data loader's position); and what DDP is then told (allow_unused)."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch

from peftcli.config.schema import ModelSpec, TrainSpec
from peftcli.data.batching import train_loader
from peftcli.methods import METHODS
from peftcli.models.loading import load_base_model, set_dropout
from peftcli.tasks.registry import IGNORE_INDEX, TASKS
from peftcli.training.accelerator import make_accelerator
from peftcli.training.distributed import allow_unused, data_parallel, first_batch, unused_parameters
from tests.conftest import sample_batch, tiny_model
from tests.helpers import adapt, mean_loss


def test_the_probe_finds_bert2berts_unused_pooler_and_leaves_the_model_as_it_was(
    tiny_dirs: dict[str, Path], tokenizer
) -> None:
    folder = str(tiny_dirs["bert-cls"])
    model = load_base_model(ModelSpec(name=folder, decoder=folder), TASKS["seq2seq_lm"])
    adapt(model, METHODS["lora"], "seq2seq_lm", rank=4, alpha=8)  # all-linear: the encoder's pooler too
    set_dropout(model, 0.1)  # so that the probe's forward draws random numbers
    model.register_buffer("running", torch.zeros(1))  # stands for a BatchNorm's running statistics

    def count_forwards(module: torch.nn.Module, args: object, output: object) -> None:
        model.running.add_(1.0)

    model.encoder.embeddings.register_forward_hook(count_forwards)
    model.eval()
    batch = dict(tokenizer(["good film was fun", "bad book"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([[8, 9, 3], [12, 3, IGNORE_INDEX]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    unused = unused_parameters(model, batch, mean_loss("seq2seq_lm"))

    pooler = [n for n, p in model.named_parameters() if p.requires_grad and ".pooler." in n]
    assert pooler and unused == pooler
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.running.item() == 0.0


def test_a_classifier_uses_every_trainable_parameter(tokenizer) -> None:
    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], "sequence_classification", rank=4, alpha=8)
    batch = sample_batch("bert-cls", tokenizer) | {"labels": torch.tensor([0, 1, 0, 1])}
    assert unused_parameters(model, batch, mean_loss("sequence_classification")) == []


def test_the_first_batch_is_taken_without_moving_the_loader_or_the_generators() -> None:
    ds = datasets.Dataset.from_dict({"input_ids": [[5] * (i % 6 + 1) for i in range(20)], "labels": list(range(20))})
    loader = train_loader(ds, 0, 4, 1, True, 7)
    generator, rng = loader.generator.get_state(), torch.get_rng_state()
    first = first_batch(loader)
    assert torch.equal(loader.generator.get_state(), generator) and torch.equal(torch.get_rng_state(), rng)
    again = next(iter(loader))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_ddp_is_told_to_look_for_unused_parameters_only_when_there_are_some() -> None:
    accelerator = make_accelerator(TrainSpec())
    assert not data_parallel(accelerator)  # one process: nothing to all-reduce, no probe
    allow_unused(accelerator, [])
    assert accelerator.ddp_handler is None
    allow_unused(accelerator, ["encoder.pooler.dense.lora_A.weight"])
    assert accelerator.ddp_handler is not None and accelerator.ddp_handler.to_kwargs() == {
        "find_unused_parameters": True
    }
