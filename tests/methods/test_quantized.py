"""A quantized base (bitsandbytes, on this CPU): tiny Llama and GPT-2 loaded in 4 bits (NF4) and 8 bits
(LLM.int8). LoRA, AdaLoRA and (IA)^3 wrap the quantized layers and train (loss falls, only the adapter
changes, the quantized weights stay bit-identical), save -> load keeps the outputs, and adapters move
between peftcli and HF peft on the same quantized base in both directions. The models are 64 wide:
bitsandbytes quantizes 4-bit weights in blocks of 64 inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftcli.config.schema import ModelSpec, TrainSpec
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.models.loading import load_base_model
from peftcli.models.quantization import weight_memory
from peftcli.tasks.registry import TASKS
from tests.conftest import VOCAB, make_tokenizer
from tests.helpers import adapt, logits, random_batches, randomize_trainable, run_training, training_hooks

pytest.importorskip("bitsandbytes")
LM = "causal_lm"


def config(arch: str):
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    if arch == "llama-lm":
        return LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **ids,
        )  # fmt: skip
    return GPT2Config(vocab_size=len(VOCAB), n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantizable")
    out = {}
    for arch, cls in (("llama-lm", LlamaForCausalLM), ("gpt2-lm", GPT2LMHeadModel)):
        torch.manual_seed(0)
        cls(config(arch)).save_pretrained(root / arch)
        make_tokenizer().save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def quantized(folder: Path, bits: int) -> torch.nn.Module:
    quantization = {"bits": bits} | ({"compute_dtype": "float32"} if bits == 4 else {})
    return load_base_model(ModelSpec(name=str(folder), quantization=quantization), TASKS[LM])


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}


def frozen_bytes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


CASES = [("lora", "llama-lm", 4), ("lora", "llama-lm", 8), ("lora", "gpt2-lm", 4), ("lora", "gpt2-lm", 8)]
CASES += [("ia3", "llama-lm", 4), ("ia3", "llama-lm", 8), ("adalora", "llama-lm", 4), ("adalora", "gpt2-lm", 8)]
# Methods that add modules rather than wrap linear layers work over a quantized base unchanged.
CASES += [
    ("prompt_tuning", "llama-lm", 4),
    ("p_tuning", "llama-lm", 4),
    ("prefix_tuning", "llama-lm", 4),
    ("bottleneck", "llama-lm", 4),
]


@pytest.mark.parametrize(("method", "arch", "bits"), CASES)
def test_methods_train_only_the_adapter_over_a_quantized_base(
    method, arch, bits, folders, tiny_data, tokenizer
) -> None:
    model = quantized(folders[arch], bits)
    layers = quantized_layers(model)
    assert layers and all(type(m).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt") for m in layers.values())
    assert type(model.get_output_embeddings()).__name__ == "Linear"  # the head stays in float
    params, adapted = adapt(model, METHODS[method], LM)
    if method in ("lora", "ia3", "adalora"):
        assert {n.rsplit(".base_layer", 1)[0] for n in quantized_layers(model)} >= set(adapted.adapted_modules)
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights for the CPU at their first forward
        model(**{k: v for k, v in random_batches(model, LM, n=1)[0].items() if k != "labels"})
    frozen = frozen_bytes(model)
    result = run_training(
        model, LM, tokenizer, tiny_data,
        TrainSpec(batch_size=8, max_steps=10, log_every=1, seed=0, mixed_precision="no"),
        method_hooks=training_hooks(model, METHODS[method], params, adapted),
    )  # fmt: skip
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[name], p.detach()), name  # quantized weights, norms, head: untouched


@pytest.mark.parametrize("bits", [4, 8])
def test_save_load_and_hf_peft_both_ways_on_the_quantized_base(bits, folders, tmp_path) -> None:
    task = TASKS[LM]
    batch = {k: v for k, v in random_batches(quantized(folders["llama-lm"], bits), LM, n=1)[0].items() if k != "labels"}
    ours = quantized(folders["llama-lm"], bits)
    params, adapted = adapt(ours, METHODS["lora"], LM, rank=4, alpha=8, target_modules="all-linear")
    randomize_trainable(ours)
    trained = logits(ours, batch)
    config = adapter_config(METHODS["lora"], params, adapted, task, str(folders["llama-lm"]), None)
    save_adapter(tmp_path / "ours", method_state(METHODS["lora"], ours, adapted), config)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and not any("quant" in k or "bits" in k for k in saved)

    loaded = quantized(folders["llama-lm"], bits)
    load_adapter(tmp_path / "ours", loaded, task)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)

    theirs = PeftModel.from_pretrained(quantized(folders["llama-lm"], bits), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, batch), trained, rtol=1e-5, atol=1e-5)

    mine, theirs = hf_peft_adapter_in_ours(folders["llama-lm"], bits, tmp_path / "theirs", batch)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def hf_peft_adapter_in_ours(folder: Path, bits: int, out: Path, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """An HF peft QLoRA adapter (random values) saved to `out` and loaded by peftcli on the same quantized
    base: the logits of ours and of HF peft's model on `batch` (tests/gpu/test_quantized_gpu.py too)."""
    hf = get_peft_model(
        quantized(folder, bits), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    randomize_trainable(hf, seed=3)
    hf.save_pretrained(out)
    mine = quantized(folder, bits)
    load_adapter(out, mine, TASKS[LM])
    return logits(mine, batch), logits(hf.eval(), batch)


def test_a_quantized_adapter_loads_on_the_full_precision_base(folders, tmp_path) -> None:
    """The adapter file is the ordinary LoRA one: it loads on the unquantized model too, where the
    outputs differ by what the 4 bits cost (measured here, stated in docs/quantization.md)."""
    task = TASKS[LM]
    ours = quantized(folders["llama-lm"], 4)
    params, adapted = adapt(ours, METHODS["lora"], LM, rank=4, alpha=8)
    randomize_trainable(ours)
    save_adapter(
        tmp_path / "a",
        method_state(METHODS["lora"], ours, adapted),
        adapter_config(METHODS["lora"], params, adapted, task, str(folders["llama-lm"]), None),
    )
    full = load_base_model(ModelSpec(name=str(folders["llama-lm"])), task)
    load_adapter(tmp_path / "a", full, task)
    batch = {k: v for k, v in random_batches(full, LM, n=1)[0].items() if k != "labels"}
    # The adapter's tensors are the same on both bases: what differs is what NF4 did to the base's
    # weights, the same gap the bases alone show.
    with_adapter = float((logits(full, batch) - logits(ours, batch)).abs().max())
    bases_alone = float(
        (
            logits(load_base_model(ModelSpec(name=str(folders["llama-lm"])), task), batch)
            - logits(quantized(folders["llama-lm"], 4), batch)
        )
        .abs()
        .max()
    )
    assert 0 < with_adapter <= 2 * bases_alone


@pytest.mark.parametrize("arch", ["llama-lm", "gpt2-lm"])
def test_weight_memory_counts_what_the_bits_saved(arch, folders) -> None:
    full = load_base_model(ModelSpec(name=str(folders[arch])), TASKS[LM])
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    assert weight_memory(full, torch.float32) == {"weights": full_bytes, "weights_unquantized": full_bytes}
    eight, four = quantized(folders[arch], 8), quantized(folders[arch], 4)
    layers = quantized_layers(eight)
    values = sum(m.in_features * m.out_features for m in layers.values())
    rows = sum(m.out_features for m in layers.values())
    # LLM.int8: a byte a value instead of four, plus one float32 scale a row.
    assert weight_memory(eight, torch.float32) == {
        "weights": full_bytes - 3 * values + 4 * rows,
        "weights_unquantized": full_bytes,
    }
    # NF4: half a byte a value, plus the scales of each block of 64 (double-quantized: 8 bits each).
    four_memory = weight_memory(four, torch.float32)
    assert four_memory["weights_unquantized"] == full_bytes
    assert (
        full_bytes - 4 * values + values // 2
        < four_memory["weights"]
        < full_bytes - 4 * values + values // 2 + values // 32
    )
