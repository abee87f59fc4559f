"""P-tuning against HF peft (same encoder, same outputs, both directions, MLP and LSTM), training
through either encoder, and the folding of the encoder into the saved `prompt_embeddings`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file

from peftcli.config.load import validate_method
from peftcli.config.schema import TrainSpec
from peftcli.methods import METHODS
from peftcli.methods._virtual_tokens import PromptEmbedding
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import SINGLE_STACK, TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, run_training
from tests.methods.test_prompt_tuning import assert_generation_matches, load_theirs, save_ours, trainable_count

N = 4
ENCODERS = {
    "mlp": {"encoder": "mlp", "encoder_hidden_size": 16},
    "lstm": {"encoder": "lstm", "encoder_hidden_size": 8, "encoder_num_layers": 2},
}


def hf_config(task_type: str, settings: dict) -> PromptEncoderConfig:
    return PromptEncoderConfig(
        task_type=task_type,
        num_virtual_tokens=N,
        encoder_reparameterization_type=settings["encoder"].upper(),
        encoder_hidden_size=settings["encoder_hidden_size"],
        encoder_num_layers=settings.get("encoder_num_layers", 2),
    )


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("arch", SINGLE_STACK)
def test_our_p_tuning_loads_in_hf_peft_with_equal_outputs(arch: str, encoder: str, tokenizer, tmp_path: Path) -> None:
    batch = sample_batch(arch, tokenizer)
    ours = save_ours("p_tuning", arch, tmp_path, batch, num_virtual_tokens=N, **ENCODERS[encoder])
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    out = logits(theirs, batch)
    out = out[:, N:] if TINY[arch][1] == "causal_lm" else out
    torch.testing.assert_close(out, ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("arch", SINGLE_STACK)
def test_hf_peft_p_tuning_loads_in_ours_with_equal_outputs(arch: str, encoder: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    batch = sample_batch(arch, tokenizer)
    expected, n_trainable = load_theirs(arch, hf_config(task.peft_task_type, ENCODERS[encoder]), tmp_path, batch)

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, task)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-6, atol=1e-6)
    # Training counts the whole encoder, as HF peft does; the loaded adapter is the folded table.
    fresh = tiny_model(arch)
    adapt(fresh, METHODS["p_tuning"], task.name, num_virtual_tokens=N, **ENCODERS[encoder])
    assert trainable_count(fresh) == n_trainable
    assert isinstance(ours.prompt_encoder, PromptEmbedding)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_encoder_is_hf_peft_s_prompt_encoder(encoder: str) -> None:
    """Same parameter names and shapes, and the same initial values for the same seed."""
    model, base = tiny_model("llama-lm"), tiny_model("llama-lm")
    torch.manual_seed(5)
    adapt(model, METHODS["p_tuning"], "causal_lm", num_virtual_tokens=N, **ENCODERS[encoder])
    torch.manual_seed(5)
    theirs = get_peft_model(base, hf_config("CAUSAL_LM", ENCODERS[encoder]))
    ours_state = model.prompt_encoder.state_dict()
    theirs_state = theirs.prompt_encoder["default"].state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("arch", ["gpt2-lm", "llama-lm"])
def test_both_encoders_train_and_fold_into_the_saved_embeddings(
    arch: str, encoder: str, tokenizer, tiny_data, tmp_path: Path
) -> None:
    """On the causal LMs: the tiny random classifiers read their label from position 0 (BERT) or the
    last, often padding, position (Llama), where prepended virtual tokens leave almost no trace of the
    input (pooled output std ~1e-4 across inputs), so 12 steps cannot lower their loss."""
    task = TASKS[TINY[arch][1]]
    method = METHODS["p_tuning"]
    model = tiny_model(arch)
    params, adapted = adapt(model, method, task.name, num_virtual_tokens=N, **ENCODERS[encoder])
    before = {n: p.detach().clone() for n, p in model.prompt_encoder.named_parameters()}
    result = run_training(
        model, task.name, tokenizer, tiny_data, TrainSpec(batch_size=8, max_steps=12, log_every=1, seed=0)
    )
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(not torch.equal(p, before[n]) for n, p in model.prompt_encoder.named_parameters())

    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
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
    loaded = tiny_model(arch)
    load_adapter(tmp_path, loaded, task)
    assert torch.equal(logits(loaded, batch), expected)


def test_saved_embeddings_are_taken_without_dropout() -> None:
    model = tiny_model("llama-lm")
    settings = {"encoder": "lstm", "encoder_hidden_size": 8, "encoder_num_layers": 2, "encoder_dropout": 0.5}
    _, adapted = adapt(model, METHODS["p_tuning"], "causal_lm", num_virtual_tokens=N, **settings)
    model.train()
    first = METHODS["p_tuning"].state(model, adapted)["prompt_embeddings"]
    second = METHODS["p_tuning"].state(model, adapted)["prompt_embeddings"]
    assert torch.equal(first, second)
    assert model.prompt_encoder.training  # the training mode is restored
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.prompt_encoder(), first)


def test_generate_equals_hf_peft_and_a_greedy_loop_without_cache(tokenizer, tmp_path: Path) -> None:
    batch = sample_batch("llama-lm", tokenizer)
    save_ours("p_tuning", "llama-lm", tmp_path, batch, num_virtual_tokens=N, **ENCODERS["lstm"])
    ours = tiny_model("llama-lm")
    load_adapter(tmp_path, ours, TASKS["causal_lm"])
    assert_generation_matches(ours, PeftModel.from_pretrained(tiny_model("llama-lm"), tmp_path), batch)


def test_default_hidden_size_is_the_model_s_and_is_recorded(tmp_path: Path) -> None:
    method = METHODS["p_tuning"]
    model = tiny_model("gpt2-lm")
    params, adapted = adapt(model, method, "causal_lm")
    config = adapter_config(method, params, adapted, TASKS["causal_lm"], "tiny", None)
    assert config["encoder_hidden_size"] == model.config.hidden_size == model.prompt_encoder.mlp_head[0].out_features
    assert (config["encoder_reparameterization_type"], config["num_virtual_tokens"], config["token_dim"]) == (
        "MLP",
        20,
        32,
    )


@pytest.mark.parametrize(
    "settings,key,message",
    [
        (
            {"encoder_num_layers": 3},
            "encoder_num_layers",
            (
                "encoder_num_layers sets the LSTM encoder only; the mlp has three fixed layers and no dropout. "
                "Set encoder: lstm, or remove it (got 3)."
            ),
        ),
        (
            {"encoder_dropout": 0.1},
            "encoder_dropout",
            (
                "encoder_dropout sets the LSTM encoder only; the mlp has three fixed layers and no dropout. "
                "Set encoder: lstm, or remove it (got 0.1)."
            ),
        ),
        ({"encoder": "gru"}, "encoder", "input should be 'mlp' or 'lstm' (got 'gru')."),
    ],
)
def test_bad_params_are_reported_with_the_key_and_value(settings: dict, key: str, message: str) -> None:
    assert validate_method({"name": "p_tuning", **settings}) == (None, [(("method", key), message)])


def test_lstm_options_are_accepted_with_the_lstm() -> None:
    params, problems = validate_method(
        {"name": "p_tuning", "encoder": "lstm", "encoder_num_layers": 3, "encoder_dropout": 0.1}
    )
    assert problems == [] and params.encoder_num_layers == 3
