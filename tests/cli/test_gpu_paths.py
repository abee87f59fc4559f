"""The accelerator paths a GPU user takes, each proven on the closest CPU stand-in torch allows:
FSDP2 over gloo (sharded eval that must not hang, the adapter gathered whole in fp32), fp16 autocast
with torch's CPU grad scaler (fp32 masters over fp16 weights, a skipped step followed by more),
first-position narrowing under autocast, the DeepSpeed config filled from the recipe, AdaLoRA refused
under sharded engines, and what `mixed_precision: auto` picks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from safetensors.torch import load_file

import peftcli.training.precision
from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.errors import MethodError
from peftcli.methods import METHODS
from peftcli.methods.base import TrainingHooks
from peftcli.tasks.registry import TASKS
from peftcli.training.loop import Hooks, train
from peftcli.training.run import check_engine
from tests.cli.fsdp2_train_worker import lora_model, run
from tests.cli.test_cli import ROOT
from tests.conftest import sentiment_rows, tiny_model, write_jsonl
from tests.helpers import adapt, data_spec

CLS = "sequence_classification"


def fresh_accelerator(**kwargs) -> Accelerator:
    AcceleratorState._reset_state()
    return Accelerator(cpu=True, **kwargs)


# -- FSDP2 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp-data")
    write_jsonl(folder / "train.jsonl", sentiment_rows(48, 0))
    write_jsonl(folder / "validation.jsonl", sentiment_rows(9, 1))  # 3 eval batches of 4: 2 and 1
    return folder


def sharded_run(data: Path, out: Path, mixed_precision: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "cli" / "fsdp2_train_worker.py"), str(data), str(out), mixed_precision]
    done = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        env=dict(os.environ) | {"PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fsdp2_training_with_uneven_evals_saves_the_unsharded_adapter_in_fp32(
    mixed_precision, fsdp_data, tmp_path
) -> None:
    if mixed_precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16")
    result = sharded_run(fsdp_data, tmp_path, mixed_precision)
    # The reference: one unsharded process accumulating both processes' micro-batches.
    torch.manual_seed(0)
    final, _best, evals = run(fresh_accelerator(mixed_precision=mixed_precision), lora_model(), fsdp_data, grad_accum=2)
    sharded = load_file(tmp_path / "adapter.safetensors")
    assert sharded.keys() == final.keys() and sharded
    # bf16: the two runs round differently, and AdamW turns a near-zero gradient's sign into a whole
    # step of lr (1e-2) on a few entries; the rest agree to bf16's precision.
    tolerance = {"no": (1e-4, 1e-6), "bf16": (5e-2, 2e-2)}[mixed_precision]
    for key, tensor in final.items():
        assert sharded[key].dtype == torch.float32, key  # the fp32 masters, not the 16-bit compute copies
        assert sharded[key].shape == tensor.shape
        torch.testing.assert_close(sharded[key], tensor, rtol=tolerance[0], atol=tolerance[1])
        assert (sharded[key] - tensor).abs().mean() <= tolerance[1] / 10, key
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "best.safetensors").values())
    # Every eval ran to the end on both processes (an uneven share used to leave one waiting).
    assert sorted(int(s) for s in result["evals"]) == [2, 4, 6]
    for step, metrics in evals.items():
        assert result["evals"][str(step)]["loss"] == pytest.approx(metrics["loss"], rel=tolerance[0], abs=1e-3)


# -- fp16 with torch's CPU grad scaler ---------------------------------------------------------------


def fp16_accelerator() -> Accelerator:
    """accelerate gives fp16 a grad scaler on GPUs only; on the CPU torch has both fp16 autocast and a
    GradScaler, so the loop's scaler logic runs here as it would on CUDA."""
    accelerator = fresh_accelerator()
    accelerator.state._mixed_precision = "fp16"
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return accelerator


# BitFit over fp16 weights leaves a LayerNorm with an fp16 weight and an fp32 bias: CUDA's autocast runs
# layer_norm in fp32 (both cast), the CPU's runs it as given and refuses the mix, so it is left to tests/gpu.
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp16_weights_train_with_fp32_masters_and_a_grad_scaler(method, tiny_data, tokenizer) -> None:
    model = tiny_model("bert-cls").to(torch.float16)
    adapt(model, METHODS[method], CLS)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(p.dtype == torch.float16 for p in trainable.values())  # the head, or every weight
    before = {n: p.detach().float().clone() for n, p in trainable.items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train_tiny(model, tiny_data, tokenizer, fp16_accelerator(), max_steps=8)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


def test_a_step_skipped_under_fp16_is_followed_by_more(tiny_data, tokenizer) -> None:
    """A NaN step with clipping on: the scaler has unscaled that step's gradients, and without its
    update the next step raised "unscale_() has already been called on this optimizer"."""
    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], CLS)
    real_loss, calls = TASKS[CLS].loss_sum, {"n": 0}

    def nan_in_step_3(logits, batch):
        total, count = real_loss(logits, batch)
        calls["n"] += 1
        return (total * float("nan") if calls["n"] == 3 else total), count

    stepped: list[int] = []
    task = dataclasses.replace(TASKS[CLS], loss_sum=nan_in_step_3)
    hooks = TrainingHooks(after_optimizer_step=stepped.append)
    result = train_tiny(model, tiny_data, tokenizer, fp16_accelerator(), 6, hooks, task, skip_nonfinite_steps=1)
    assert result.steps == 6 and result.skipped_steps == 1
    assert 3 not in stepped and stepped  # the method's hooks see only steps that updated


def train_tiny(model, tiny_data, tokenizer, accelerator, max_steps: int, method_hooks=None, task=None, **spec):
    from peftcli.data.batching import eval_loader, train_loader
    from peftcli.data.prepare import prepare_data

    prepared = prepare_data(data_spec(CLS, tiny_data), CLS, tokenizer)
    t = TrainSpec(
        batch_size=8, max_steps=max_steps, log_every=1, seed=0, max_grad_norm=1.0, mixed_precision="no", **spec
    )
    loader = train_loader(prepared.train, tokenizer.pad_token_id, 8, 1, True, 0)
    evals = eval_loader(prepared.eval, tokenizer.pad_token_id, 16)
    optim, schedule = OptimizerSpec(lr=1e-2), ScheduleSpec(name="constant", warmup_steps=0)
    task = task or TASKS[CLS]
    return train(
        model=model,
        task=task,
        train_data=loader,
        eval_data=evals,
        spec=t,
        optim=optim,
        schedule=schedule,
        label_names=prepared.label_names,
        hooks=Hooks(),
        accelerator=accelerator,
        method_hooks=method_hooks,
    )


# -- DeepSpeed, AdaLoRA, auto ---------------------------------------------------------------------------


def test_the_deepspeed_config_holds_the_recipes_batch_accumulation_and_clipping() -> None:
    from peftcli.training.distributed import backward_kwargs, configure_deepspeed

    plugin = DeepSpeedPlugin(zero_stage=3)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what stopped prepare: our loader has no batch_size
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=4
    )
    configure_deepspeed(accelerator, batch_size=8, grad_accum=3, max_grad_norm=0.5)
    config = plugin.deepspeed_config
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (8, 3)
    assert (config["train_batch_size"], config["gradient_clipping"]) == (8 * 3 * 4, 0.5)
    configure_deepspeed(accelerator, batch_size=8, grad_accum=1, max_grad_norm=None)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # no clipping
    assert backward_kwargs(accelerator) == {"scale_wrt_gas": False}  # our loss is already the step's share


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_adalora_is_refused_under_sharded_engines(engine) -> None:
    accelerator = SimpleNamespace(distributed_type=engine)
    with pytest.raises(MethodError) as exc:
        check_engine(METHODS["adalora"], accelerator)
    assert exc.value.lines == [
        (
            f"method.name: adalora cannot train under {engine.value}: it reallocates ranks between steps from whole "
            f"lora_A/lora_B matrices and their gradients, which {engine.value} holds in pieces across processes "
            f"(got adalora). Use lora, or train adalora under DDP (--num-processes N)."
        )
    ]
    check_engine(METHODS["lora"], accelerator)
    check_engine(METHODS["adalora"], SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),
        ({"avx512f", "avx512_bf16"}, "bf16"),
        ({"avx512f", "avx512bw"}, "no"),  # bf16 emulated: slower than fp32
        (set(), "no"),
    ],
)
def test_auto_precision_on_cpus(flags, expected, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(peftcli.training.precision, "cpu_flags", lambda: frozenset(flags))
    assert peftcli.training.precision.resolve("auto")[0] == expected
    assert peftcli.training.precision.resolve("no") == ("no", "as the recipe asks")


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_gpus(bf16, expected, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla V100" if not bf16 else "NVIDIA H100")
    assert peftcli.training.precision.resolve("auto")[0] == expected


def test_gradient_checkpointing_under_bf16_autocast_recomputes_what_it_saved(tmp_path, tiny_dirs, tiny_data) -> None:
    """Short sequences under bf16 on a CPU take the math attention kernel; the backward's recompute
    must take it too, or checkpointing stops ("Recomputed values ... have different metadata")."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16")
    import yaml

    from peftcli.training.run import run_train
    from tests.conftest import tiny_recipe

    train = {"mixed_precision": "bf16", "gradient_checkpointing": True, "max_steps": 3}
    recipe = tiny_recipe(tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(tmp_path / "run"), train=train)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_train(path, [])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["summary"]["steps"] == 3
