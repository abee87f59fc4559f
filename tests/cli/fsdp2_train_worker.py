"""Run by torchrun with 2 CPU processes (gloo) from test_gpu_paths.py: peftcli's training loop under
FSDP2, the closest CPU stand-in for a sharded GPU run. accelerate runs FSDP on GPUs only, so the model
is sharded here with torch's `fully_shard` (each encoder layer, then the root, as accelerate's
transformer-layer wrapping does) and the accelerator is told it runs FSDP2; `prepare` then keeps the
sharded model as it is. Everything after that is the loop `peft train` runs: evals every 2 steps on
an eval split of 3 batches (the processes get 2 and 1), the adapter snapshots taken inside
`full_parameters`, and the one written at the end.

argv: DATA_DIR OUT_DIR MIXED_PRECISION. Rank 0 writes OUT_DIR/adapter.safetensors (the final
snapshot), OUT_DIR/best.safetensors and OUT_DIR/result.json (eval metrics by step)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.data.batching import eval_loader, train_loader
from peftcli.data.prepare import prepare_data
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_state
from peftcli.tasks.registry import TASKS
from peftcli.training.loop import Hooks, train
from tests.conftest import make_tokenizer, tiny_model
from tests.helpers import adapt, data_spec

CLS = "sequence_classification"
SPEC = {"batch_size": 4, "eval_batch_size": 4, "max_steps": 6, "eval_every": 2, "log_every": 1, "seed": 0}


def lora_model() -> torch.nn.Module:
    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], CLS, rank=4, alpha=8, target_modules="all-linear")
    return model


def data(folder: Path):
    files = {"sentiment_train": folder / "train.jsonl", "sentiment_validation": folder / "validation.jsonl"}
    return prepare_data(data_spec(CLS, files), CLS, make_tokenizer())


def run(accelerator: Accelerator, model: torch.nn.Module, folder: Path, grad_accum: int) -> tuple[dict, dict, dict]:
    """peftcli's loop; returns the final adapter, the best eval's adapter and the evals."""
    tokenizer = make_tokenizer()
    prepared = data(folder)
    spec = TrainSpec(**SPEC, grad_accum=grad_accum, mixed_precision=accelerator.mixed_precision)
    n, rank = accelerator.num_processes, accelerator.process_index
    loader = train_loader(prepared.train, tokenizer.pad_token_id, spec.batch_size, grad_accum, True, spec.seed, n)
    evals = eval_loader(prepared.eval, tokenizer.pad_token_id, 4, rank, n)
    out: dict = {"evals": {}}

    def on_eval(step: int, metrics: dict, improved: bool) -> None:
        out["evals"][step] = metrics
        if improved:
            out["best"] = adapter_state(model)

    def on_end() -> None:
        out["final"] = adapter_state(model)

    optim, schedule = OptimizerSpec(lr=1e-2), ScheduleSpec(name="constant", warmup_steps=0)
    hooks = Hooks(on_eval=on_eval, on_end=on_end)
    train(
        model=model,
        task=TASKS[CLS],
        train_data=loader,
        eval_data=evals,
        spec=spec,
        optim=optim,
        schedule=schedule,
        label_names=prepared.label_names,
        hooks=hooks,
        accelerator=accelerator,
    )
    return out["final"], out["best"], out["evals"]


def main(folder: Path, out: Path, mixed_precision: str) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    # Both shared states: accelerate copies the process state's type into its own on every lookup.
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    torch.manual_seed(0)
    model = lora_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # As accelerate's FSDP2 preparation does under mixed precision: 16-bit compute, fp32 masters and
    # gradient reduction.
    dtype = {"bf16": torch.bfloat16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    final, best, evals = run(accelerator, model, folder, grad_accum=1)
    if accelerator.is_main_process:
        save_file(final, str(out / "adapter.safetensors"))
        save_file(best, str(out / "best.safetensors"))
        (out / "result.json").write_text(json.dumps({"evals": evals, "precision": accelerator.mixed_precision}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
    # Everything is written and the group closed; leave without the interpreter's teardown, in which
    # gloo's threads sometimes abort (see fsdp2_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
