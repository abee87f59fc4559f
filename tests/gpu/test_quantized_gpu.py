"""QLoRA on a CUDA GPU, through bitsandbytes' CUDA kernels (CI has no GPU; `benchmarks/device/run.sh`
runs these there): `peft train` over a 4-bit (bf16 compute) and an 8-bit base trains on the GPU, then
evaluates and merges; the adapter and HF peft's move both ways on the same quantized base; the paged
8-bit optimizer, which pages on CUDA only, resumes bit-exact; a model that loads as float (GGUF) is
quantized layer by layer onto the GPU. The CPU versions of these are tests/methods/test_quantized.py and
tests/cli/test_quantized_cli.py."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftcli.config.schema import ModelSpec
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_config, method_state, save_adapter
from peftcli.models.quantization import quantize_loaded
from peftcli.tasks.registry import TASKS
from tests.cli.test_cli import peft, write_recipe
from tests.conftest import tiny_recipe
from tests.gpu.test_cuda import train_losses
from tests.helpers import adapt, logits, random_batches, randomize_trainable
from tests.methods.test_quantized import (  # noqa: F401 - folders: the fixture
    folders,
    hf_peft_adapter_in_ours,
    quantized,
    quantized_layers,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("bitsandbytes")
LM = "causal_lm"


def on_gpu(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_evaluates_and_merges_on_the_gpu(bits, tmp_path: Path, folders, tiny_data) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        folders["llama-lm"], tiny_data, LM, output_dir=str(run_dir), model={"quantization": {"bits": bits}},
        optimizer={"name": "paged_adamw8bit", "lr": 1e-2},
        train={"mixed_precision": "bf16", "max_steps": 24, "log_every": 1, "eval_every": 24},
    )  # fmt: skip
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    summary = report["summary"]
    assert summary["device"].startswith("cuda") and summary["peak_memory_mb"] > 0
    assert summary["weights_bytes"] < summary["weights_bytes_unquantized"]
    losses = train_losses(run_dir)
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    assert statistics.mean(losses[-6:]) < 0.95 * statistics.mean(losses[:6])

    result = peft("eval", str(run_dir), "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    # The run's own eval ran under bf16 autocast; `peft eval` runs in fp32 (its 4-bit layers in bf16 either way).
    assert evaluated["metrics"]["loss"] == pytest.approx(report["final_metrics"]["loss"], rel=2e-2)

    result = peft("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert f"dequantized from {bits} bits: merge error" in " ".join(result.stdout.split() + result.stderr.split())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").cuda().eval()
    assert not hasattr(merged.config, "quantization_config")
    batch = on_gpu(random_batches(merged, LM, n=1)[0])
    assert torch.isfinite(logits(merged, batch)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_move_both_ways_with_hf_peft_on_the_gpu(bits, folders, tmp_path: Path) -> None:  # noqa: F811
    """The same quantized base, loaded on the GPU by peftcli and by HF peft: our adapter gives equal
    logits in theirs, and theirs in ours."""
    task = TASKS[LM]
    ours = quantized(folders["llama-lm"], bits)
    assert quantized_layers(ours) and all(p.is_cuda for p in ours.parameters())
    params, adapted = adapt(ours, METHODS["lora"], LM, rank=4, alpha=8)
    randomize_trainable(ours)
    batch = on_gpu(random_batches(ours, LM, n=1)[0])
    trained = logits(ours, batch)
    save_adapter(
        tmp_path / "ours",
        method_state(METHODS["lora"], ours, adapted),
        adapter_config(METHODS["lora"], params, adapted, task, str(folders["llama-lm"]), None),
    )
    theirs = PeftModel.from_pretrained(quantized(folders["llama-lm"], bits), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, batch), trained, rtol=1e-4, atol=1e-4)

    mine, theirs = hf_peft_adapter_in_ours(folders["llama-lm"], bits, tmp_path / "theirs", batch)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_the_paged_8bit_optimizer_resumes_bit_exact_on_the_gpu(tmp_path: Path, folders, tiny_data) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    recipe = write_recipe(
        tmp_path,
        tiny_recipe(
            folders["llama-lm"], tiny_data, LM, output_dir=str(run_dir), model={"quantization": {"bits": 4}},
            optimizer={"name": "paged_adamw8bit", "lr": 1e-2},
            train={"max_steps": 8, "save_every": 4, "eval_every": 4, "log_every": 1, "mixed_precision": "bf16"},
        ),
    )  # fmt: skip
    assert peft("train", str(recipe)).returncode == 0
    finished = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    result = peft("train", str(recipe), "--resume", str(run_dir / "checkpoints" / "step-4"))
    assert result.returncode == 0, result.stderr
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == finished


@pytest.mark.parametrize("bits", [4, 8])
def test_a_float_loaded_model_is_quantized_onto_the_gpu(bits, folders) -> None:  # noqa: F811
    """What a GGUF base goes through (transformers loads it as float): each linear layer replaced by a
    bitsandbytes one on the GPU, computing what the same layers quantized while loading compute."""
    model = AutoModelForCausalLM.from_pretrained(folders["llama-lm"]).eval()  # on the CPU, as GGUF loads
    quantization = {"bits": bits} | ({"compute_dtype": "float32"} if bits == 4 else {})
    quantize_loaded(model, ModelSpec(name="m", quantization=quantization).quantization, TASKS[LM].head_modules)
    layers = quantized_layers(model)
    assert layers and all(p.is_cuda for p in model.parameters())  # the embeddings, norms and head too
    loaded = quantized(folders["llama-lm"], bits)
    assert layers.keys() == quantized_layers(loaded).keys()
    batch = on_gpu(random_batches(model, LM, n=1)[0])
    torch.testing.assert_close(logits(model, batch), logits(loaded, batch), rtol=1e-4, atol=1e-4)
