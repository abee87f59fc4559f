"""`model.quantization` from the command line: refusals word for word (exit 2, nothing written), a
QLoRA run end to end (train, eval, merge with its errors reported), on tiny 64-wide models."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.reporting.report import size_text
from tests.cli.test_bad_inputs import refused
from tests.conftest import tiny_recipe
from tests.helpers import logits, random_batches
from tests.methods.test_quantized import folders  # noqa: F401 - the fixture

pytest.importorskip("bitsandbytes")
KEY = "model.quantization"
MOMENTS = ("exp_avg", "exp_avg_sq", "state1", "state2")  # torch's AdamW's and bitsandbytes' names


def recipe_file(tmp_path: Path, folder: Path, tiny_data, **sections) -> Path:
    recipe = tiny_recipe(folder, tiny_data, "causal_lm", output_dir=str(tmp_path / "run"), **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("quantization", "method", "line"),
    [
        (
            {"bits": 4},
            {"name": "bitfit"},
            (
                "method.name: bitfit trains the base model's biases, which a 4-bit base holds quantized and frozen "
                "(got bitfit with model.quantization). Use one of: lora, adalora, ia3, prefix_tuning, prompt_tuning, "
                "p_tuning, bottleneck; "
                "or remove model.quantization."
            ),
        ),
        (
            {"bits": 8, "quant_type": "nf4"},
            None,
            f"{KEY}.quant_type: applies to bits 4 only (got 'nf4' with bits 8). Remove it.",
        ),
        (
            {"bits": 3},
            None,
            f"{KEY}.bits: input should be 4 or 8 (got 3).",
        ),
    ],
)
def test_refusals(quantization, method, line, tmp_path, folders, tiny_data, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)
    sections = {"model": {"quantization": quantization}} | ({"method": method} if method else {})
    recipe = recipe_file(tmp_path, folders["llama-lm"], tiny_data, **sections)
    if method:
        data = yaml.safe_load(recipe.read_text())
        data["method"] = method
        recipe.write_text(yaml.safe_dump(data))
    refused(tmp_path, "validate", str(recipe), lines=[f"{recipe}: {line}"])


def test_without_bitsandbytes_the_recipe_says_what_to_install(tmp_path, folders, tiny_data, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    recipe = recipe_file(tmp_path, folders["llama-lm"], tiny_data, model={"quantization": {"bits": 4}})
    refused(
        tmp_path,
        "train",
        str(recipe),
        lines=[
            (
                f"{recipe}: {KEY}: needs bitsandbytes, which is not installed (got bits 4). Install it: "
                "pip install 'peftcli[quant]'."
            )
        ],
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_run_trains_evaluates_and_merges(bits, tmp_path, folders, tiny_data, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)
    quantization = {"bits": bits} | ({"compute_dtype": "float32"} if bits == 4 else {})
    recipe = recipe_file(
        tmp_path, folders["llama-lm"], tiny_data, model={"quantization": quantization}, train={"max_steps": 8}
    )
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["summary"]["steps"] == 8
    # What the bits saved, in the report and the end line: the unquantized size is the float base's.
    full = AutoModelForCausalLM.from_pretrained(folders["llama-lm"])
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    s = report["summary"]
    assert s["quantization"] == {4: "4 bits (nf4)", 8: "8 bits (LLM.int8)"}[bits]
    assert s["weights_bytes_unquantized"] == full_bytes and s["weights_bytes"] < full_bytes
    said = " ".join((result.stdout + result.stderr).split())
    ratio = f"{s['weights_bytes'] / full_bytes:.2f}x"
    assert (
        f"base weights: {size_text(s['weights_bytes'])} in {s['quantization']}, {ratio} the {size_text(full_bytes)} "
        "they take unquantized" in said
    )

    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.stderr
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["merged"] is False  # a quantized base keeps the adapter apart
    assert evaluated["metrics"]["loss"] == pytest.approx(report["final_metrics"]["loss"], rel=1e-5)

    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert f"dequantized from {bits} bits: merge error" in said and "quantization error" in said
    computes = "(LLM.int8 also rounds activations)" if bits == 8 else "in float32"
    assert f"from the adapted {bits}-bit model as it computes {computes};" in said
    assert re.search(r"which picks the same next token at \d+\.\d% of the probe positions \(what the bits cost\)", said)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    batch = {k: v for k, v in random_batches(merged, "causal_lm", n=1)[0].items() if k != "labels"}
    assert torch.isfinite(logits(merged, batch)).all()


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_train_and_resume_bit_exact(
    optimizer,
    tmp_path,
    folders,  # noqa: F811
    tiny_data,
    monkeypatch,
    capsys,
) -> None:
    """Their moments live in 8 bits with per-block scales, in a dict inside the optimizer state: the
    checkpoint keeps them all, so a resumed run ends with the same bytes. Rank 64 makes LoRA's A matrices
    4,096 values, the size from which bitsandbytes keeps 8-bit moments (smaller tensors get 32-bit ones);
    every 8-bit parameter's state shares the same quantization maps, which the checkpoint must copy."""
    from safetensors.torch import load_file

    from peftcli.training.run import run_train

    monkeypatch.chdir(tmp_path)
    recipe = recipe_file(
        tmp_path, folders["llama-lm"], tiny_data, model={"quantization": {"bits": 4, "compute_dtype": "float32"}},
        method={"rank": 64, "alpha": 64}, optimizer={"name": optimizer, "lr": 1e-3},
        train={"max_steps": 8, "save_every": 4, "eval_every": 4, "log_every": 1},
    )  # fmt: skip
    run_train(recipe, [])
    said = " ".join(capsys.readouterr().err.split())
    paged = "optimizer: paged_adamw8bit runs as adamw8bit here (bitsandbytes pages its state on CUDA only)"
    assert (paged in said) == (optimizer == "paged_adamw8bit")
    run = tmp_path / "run"
    saved = load_file(run / "checkpoints" / "step-4" / "training_state.safetensors")
    moments = {k: t.dtype for k, t in saved.items() if k.endswith(("state1", "state2"))}
    assert torch.uint8 in moments.values() and torch.float32 in moments.values()  # 8-bit and 32-bit ones
    finished = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]
    run_train(recipe, [], resume=str(run / "checkpoints" / "step-4"))
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == finished


def test_inspect_counts_the_quantized_weights_and_the_8bit_optimizer(tmp_path, folders, tiny_data, monkeypatch) -> None:  # noqa: F811
    """`peft inspect`'s estimate of the optimizer state is what the optimizer holds after a step. Rank 64 gives
    tensors on both sides of bitsandbytes' 4,096 values, below which its 8-bit AdamW keeps fp32 moments."""
    from peftcli.commands.inspection import run_inspect
    from peftcli.models.target import build, resolve_target
    from peftcli.training.optim import make_optimizer

    monkeypatch.chdir(tmp_path)
    infos, held = {}, {}
    for name, model, optimizer in (
        ("fp32", {}, "adamw"),
        ("nf4", {"quantization": {"bits": 4, "compute_dtype": "float32"}}, "adamw8bit"),
    ):
        recipe = recipe_file(
            tmp_path, folders["llama-lm"], tiny_data, model=model, optimizer={"name": optimizer},
            method={"rank": 64, "alpha": 64},
        )  # fmt: skip
        infos[name] = run_inspect(recipe, [], False)
        target = resolve_target(recipe, [])
        built = build(target)
        step = make_optimizer(built.model, target.recipe.optimizer)
        ids = torch.tensor([[4, 5, 6, 7]])
        built.model(input_ids=ids, labels=ids).loss.backward()
        step.step()
        moments = [t for slots in step.state.values() for k, t in slots.items() if k in MOMENTS]
        held[name] = sum(t.numel() * t.element_size() for t in moments)
    fp32, nf4 = infos["fp32"], infos["nf4"]
    assert nf4["total_parameters"] == fp32["total_parameters"]  # a 4-bit byte holds two parameters
    assert nf4["trainable_parameters"] == fp32["trainable_parameters"]
    adapter = 4 * fp32["trainable_parameters"]  # fp32 on both
    base = {name: info["memory_bytes"]["weights"] - adapter for name, info in infos.items()}
    assert base["nf4"] < 0.6 * base["fp32"]  # embeddings and head stay fp32
    assert fp32["memory_bytes"]["optimizer_state"] == held["fp32"] == 8 * fp32["trainable_parameters"]
    assert nf4["memory_bytes"]["optimizer_state"] == held["nf4"] < 0.5 * held["fp32"]


def test_the_paged_8bit_optimizer_pages_on_cuda_only(folders) -> None:  # noqa: F811
    """bitsandbytes pages optimizer state on CUDA only; on a CPU its paged AdamW warns at the first step and
    runs as the plain one, so a CPU run takes the plain one at once: no warning, the same updates."""
    import bitsandbytes as bnb

    from peftcli.config.schema import OptimizerSpec
    from peftcli.training.optim import make_optimizer

    model = AutoModelForCausalLM.from_pretrained(folders["llama-lm"])
    spec = OptimizerSpec(name="paged_adamw8bit")
    assert type(make_optimizer(model, spec, on_cuda=True)) is bnb.optim.PagedAdamW8bit
    on_cpu = make_optimizer(model, spec)
    assert type(on_cpu) is bnb.optim.AdamW8bit
    model(input_ids=torch.tensor([[4, 5, 6]]), labels=torch.tensor([[4, 5, 6]])).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_cpu.step()
