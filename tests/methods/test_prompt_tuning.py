"""Prompt tuning against HF peft (same weights, same outputs, both directions), its three
initializations, the saved file, the attention mask over padding, and generation with the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftcli.config.load import validate_method
from peftcli.errors import MethodError
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import SINGLE_STACK, TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable

N = 4  # virtual tokens in these tests


def hf_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], arch: str, n: int = N) -> torch.Tensor:
    """HF peft returns a causal LM's logits for the virtual positions too; ours start at the input."""
    out = logits(model, batch)
    return out[:, n:] if TINY[arch][1] == "causal_lm" else out


def save_ours(
    method_name: str, arch: str, folder: Path, batch: dict[str, torch.Tensor], **settings: Any
) -> torch.Tensor:
    """Applies our method with random weights, saves it to `folder`, and returns its logits on `batch`."""
    task = TASKS[TINY[arch][1]]
    method = METHODS[method_name]
    model = tiny_model(arch)
    params, adapted = adapt(model, method, task.name, **settings)
    randomize_trainable(model)
    save_adapter(
        folder, method_state(method, model, adapted), adapter_config(method, params, adapted, task, "tiny", None)
    )
    return logits(model, batch)


def load_theirs(arch: str, config: Any, folder: Path, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """HF peft's adapter with random weights, saved to `folder`: its logits on `batch` and trainable count."""
    theirs = get_peft_model(tiny_model(arch), config)
    randomize_trainable(theirs, seed=3)
    expected = hf_logits(theirs, batch, arch, config.num_virtual_tokens)
    theirs.save_pretrained(folder)
    return expected, theirs.get_nb_trainable_parameters()[0]


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", SINGLE_STACK)
def test_our_prompt_tuning_loads_in_hf_peft_with_equal_outputs(arch: str, tokenizer, tmp_path: Path) -> None:
    batch = sample_batch(arch, tokenizer)
    ours = save_ours("prompt_tuning", arch, tmp_path, batch, num_virtual_tokens=N)
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(hf_logits(theirs, batch, arch), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", SINGLE_STACK)
def test_hf_peft_prompt_tuning_loads_in_ours_with_equal_outputs(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    batch = sample_batch(arch, tokenizer)
    expected, n_trainable = load_theirs(
        arch, PromptTuningConfig(task_type=task.peft_task_type, num_virtual_tokens=N), tmp_path, batch
    )

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, task)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-6, atol=1e-6)
    fresh = tiny_model(arch)
    adapt(fresh, METHODS["prompt_tuning"], task.name, num_virtual_tokens=N)
    assert trainable_count(fresh) == trainable_count(ours) == n_trainable


@pytest.mark.parametrize("arch", ["bert-cls", "llama-lm"])
def test_saved_file_holds_the_prompt_and_the_head_under_hf_peft_keys(arch: str, tmp_path: Path) -> None:
    method = METHODS["prompt_tuning"]
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, method, task.name, num_virtual_tokens=N)
    save_adapter(
        tmp_path, method_state(method, model, adapted), adapter_config(method, params, adapted, task, "tiny", None)
    )
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    head = (
        {"base_model.classifier.weight", "base_model.classifier.bias"}
        if task.name == "sequence_classification"
        else set()
    )
    assert set(state) == {"prompt_embeddings"} | head
    assert state["prompt_embeddings"].shape == (N, model.config.hidden_size)
    assert torch.equal(state["prompt_embeddings"], model.prompt_encoder.embedding.weight)

    # HF peft writes the same keys.
    theirs = get_peft_model(tiny_model(arch), PromptTuningConfig(task_type=task.peft_task_type, num_virtual_tokens=N))
    theirs.save_pretrained(tmp_path / "hf")
    assert set(load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))) == set(state)


def test_sample_vocab_rows_come_from_the_vocabulary_as_in_hf_peft() -> None:
    model = tiny_model("llama-lm")
    torch.manual_seed(7)
    adapt(model, METHODS["prompt_tuning"], "causal_lm", num_virtual_tokens=12, init="sample_vocab")
    prompt = model.prompt_encoder.embedding.weight
    vocab = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in prompt)

    base = tiny_model("llama-lm")
    torch.manual_seed(7)
    theirs = get_peft_model(
        base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=12, prompt_tuning_init="SAMPLE_VOCAB")
    )
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, prompt)


def test_random_init_equals_hf_peft_for_the_same_seed() -> None:
    model = tiny_model("bert-cls")
    torch.manual_seed(7)
    adapt(model, METHODS["prompt_tuning"], "sequence_classification", num_virtual_tokens=N, init="random")
    base = tiny_model("bert-cls")
    torch.manual_seed(7)
    theirs = get_peft_model(
        base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N, prompt_tuning_init="RANDOM")
    )
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, model.prompt_encoder.embedding.weight)


def test_text_init_equals_the_texts_embeddings_and_loads_in_hf_peft(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny_dirs["llama-lm"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    method = METHODS["prompt_tuning"]
    params, adapted = adapt(model, method, "causal_lm", num_virtual_tokens=5, init="text", init_text="good film")
    ids = AutoTokenizer.from_pretrained(folder)("good film")["input_ids"]
    assert len(ids) == 2  # repeated to five: good film good film good
    expected = model.get_input_embeddings().weight[torch.tensor((ids * 3)[:5])]
    assert torch.equal(model.prompt_encoder.embedding.weight, expected)

    config = adapter_config(method, params, adapted, TASKS["causal_lm"], str(folder), None)
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"], config["tokenizer_name_or_path"]) == (
        "TEXT",
        "good film",
        str(folder),
    )
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=5,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="good film",
            tokenizer_name_or_path=str(folder),
        ),
    )
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, expected)

    # The saved TEXT config loads in HF peft (which then reads the file, not the text).
    save_adapter(tmp_path, method_state(method, model, adapted), config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path)


def test_text_init_with_a_missing_tokenizer_says_what_to_set() -> None:
    model = tiny_model("llama-lm")  # built from a config: it has no folder and no tokenizer
    with pytest.raises(MethodError, match=r"method.tokenizer_name_or_path: .*Name a (tokenizer )?folder or hub id"):
        adapt(model, METHODS["prompt_tuning"], "causal_lm", init="text", init_text="good film")


@pytest.mark.parametrize(
    "settings,key,message",
    [
        (
            {"init": "text"},
            "init_text",
            (
                "init: text needs the text whose token embeddings start the prompt, e.g. init_text: "
                "'Classify the sentiment of this review' (got None)."
            ),
        ),
        (
            {"init_text": "good"},
            "init_text",
            (
                "init_text is used by init: text only (init is sample_vocab). Set init: "
                "text, or remove init_text (got 'good')."
            ),
        ),
        (
            {"init": "random", "tokenizer_name_or_path": "x"},
            "tokenizer_name_or_path",
            (
                "tokenizer_name_or_path is used by init: text only (init is random). Set init: "
                "text, or remove tokenizer_name_or_path (got 'x')."
            ),
        ),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens", "input should be greater than 0 (got 0)."),
    ],
)
def test_bad_params_are_reported_with_the_key_and_value(settings: dict, key: str, message: str) -> None:
    params, problems = validate_method({"name": "prompt_tuning", **settings})
    assert params is None
    assert problems == [(("method", key), message)]
    with pytest.raises(ValidationError):
        METHODS["prompt_tuning"].params(**settings)


@pytest.mark.parametrize("arch", ["bert-cls", "gpt2-lm", "llama-lm"])
def test_padding_stays_masked(arch: str, tokenizer) -> None:
    """A padded row gives the same output as the same row unpadded: the mask grows with the prompt.
    (Llama-cls given inputs_embeds pools the last position, padding or not, as in HF peft.)"""
    model = tiny_model(arch)
    adapt(model, METHODS["prompt_tuning"], TINY[arch][1], num_virtual_tokens=N)
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    lengths = batch["attention_mask"].sum(1)
    row = int(lengths.argmin())
    assert lengths[row] < batch["input_ids"].shape[1], "the sample batch must have a padded row"
    alone = {k: v[row : row + 1, : int(lengths[row])] for k, v in batch.items()}
    padded, unpadded = logits(model, batch)[row], logits(model, alone)[0]
    if TINY[arch][1] == "causal_lm":
        padded = padded[: int(lengths[row])]
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2-lm", "llama-lm"])
def test_generate_equals_hf_peft_and_a_greedy_loop_without_cache(arch: str, tokenizer, tmp_path: Path) -> None:
    batch = sample_batch(arch, tokenizer)
    save_ours("prompt_tuning", arch, tmp_path, batch, num_virtual_tokens=N)
    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, TASKS["causal_lm"])
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_generation_matches(ours, theirs, batch)


def assert_generation_matches(
    ours: torch.nn.Module, theirs: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 8
) -> None:
    """Greedy generate (with the cache) equals HF peft's and a step-by-step loop over the full sequence."""
    for row in range(2):
        length = int(batch["attention_mask"][row].sum())
        prompt = batch["input_ids"][row : row + 1, :length]
        kwargs = {
            "input_ids": prompt,
            "attention_mask": torch.ones_like(prompt),
            "max_new_tokens": steps,
            "do_sample": False,
            "pad_token_id": 0,
            "eos_token_id": None,
        }
        with torch.no_grad():
            generated = ours.generate(**kwargs)
            reference = theirs.generate(**kwargs)
            ids = prompt
            for _ in range(steps):
                next_id = (
                    ours(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                    .logits[:, -1]
                    .argmax(-1, keepdim=True)
                )
                ids = torch.cat([ids, next_id], dim=1)
        assert generated.tolist() == reference.tolist() == ids.tolist()
