"""Host syncs per training step, counted on the CPU: every read of a device value on the host
(`.item()`, `.tolist()`, `bool()`, `int()`, `float()`, `nonzero`, boolean-mask indexing) makes the host
wait for the GPU. Here the loop's batches are marked when they reach the "device" (a tensor subclass
that every value computed from them inherits), and each read of a marked value is counted with the
frame that made it. peftcli's loop must read the device a fixed number of times per optimizer step,
however many micro-batches the step holds (tests/gpu/test_gpu_readiness.py counts real CUDA syncs)."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from accelerate import Accelerator

import peftcli.training.loop
from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.data.batching import train_loader
from peftcli.data.prepare import prepare_data
from peftcli.methods import METHODS
from peftcli.tasks.registry import TASKS
from tests.conftest import make_tokenizer, tiny_model
from tests.helpers import adapt, data_spec

READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
}
PEFTCLI = str(Path(peftcli.__file__).parent)


class OnDevice(torch.Tensor):
    """A tensor the loop has put on the device; what is computed from it stays one."""

    reads: ClassVar[Counter[str]] = Counter()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mask = func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if func in READS or mask:
            cls.reads[reader()] += 1
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return out if func in READS else torch._tensor._convert(out, cls)


def reader() -> str:
    """Who read: the innermost frame outside torch, as `peftcli/<file>:<function>` or `elsewhere`."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" in frame.filename:
            continue
        if frame.filename.startswith(PEFTCLI):
            return f"peftcli/{Path(frame.filename).relative_to(PEFTCLI).as_posix()}:{frame.name}"
        return "elsewhere"  # the model's own code (transformers' attention-mask checks)
    return "elsewhere"


@pytest.mark.parametrize(("task", "arch"), [("causal_lm", "llama-lm"), ("sequence_classification", "bert-cls")])
def test_peftcli_reads_the_device_a_fixed_number_of_times_per_step(task, arch, tiny_data, monkeypatch) -> None:
    monkeypatch.setattr(
        peftcli.training.loop, "on_device", lambda batch, device: {k: v.as_subclass(OnDevice) for k, v in batch.items()}
    )
    tokenizer = make_tokenizer()
    prepared = prepare_data(data_spec(task, tiny_data), task, tokenizer)
    per_step = {}
    for accum in (1, 4):
        model = tiny_model(arch)
        adapt(model, METHODS["lora"], task)
        spec = TrainSpec(batch_size=2, grad_accum=accum, max_steps=4, log_every=100, seed=0, mixed_precision="no")
        loader = train_loader(prepared.train, tokenizer.pad_token_id, 2, accum, True, 0)
        OnDevice.reads = Counter()
        optim, schedule = OptimizerSpec(lr=1e-3), ScheduleSpec(name="constant", warmup_steps=0)
        peftcli.training.loop.train(
            model=model,
            task=TASKS[task],
            train_data=loader,
            eval_data=None,
            spec=spec,
            optim=optim,
            schedule=schedule,
            label_names=prepared.label_names,
            accelerator=Accelerator(cpu=True),
        )
        per_step[accum] = {who: n / 4 for who, n in OnDevice.reads.items() if who.startswith("peftcli/")}
    # One read per step: the loss and the gradient norm, together (loop.read_loss).
    assert per_step[1] == per_step[4] == {"peftcli/training/loop.py:read_loss": 1.0}
