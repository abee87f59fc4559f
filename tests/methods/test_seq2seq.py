"""seq2seq_lm: the labels, the loss, which methods apply, and the encoder-decoder built from two encoders.

The method contract (tests/methods/test_contract.py) and the HF peft interop tests run on the tiny T5 and
BART of tests/conftest.py like on every other arch; this file covers what is particular to the task."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import EncoderDecoderModel

from peftcli.commands.inspection import saved_parameters
from peftcli.config.load import validate_recipe
from peftcli.config.schema import ModelSpec, TrainSpec
from peftcli.data.batching import Collator
from peftcli.data.prepare import prepare_data
from peftcli.errors import MethodError, RecipeError
from peftcli.methods import METHODS, context_for
from peftcli.models.loading import load_base_model
from peftcli.tasks.registry import IGNORE_INDEX, TASKS
from tests.conftest import qa_rows, sample_batch, tiny_model, tiny_recipe
from tests.helpers import adapt, data_spec, logits, randomize_trainable, run_training

TASK = TASKS["seq2seq_lm"]


def test_labels_are_the_target_and_its_end_token_padded_with_ignore_index(tokenizer, tiny_data) -> None:
    spec = data_spec("seq2seq_lm", tiny_data)
    prepared = prepare_data(spec, "seq2seq_lm", tokenizer)
    rows = qa_rows(96, 3)  # tiny_data's training split
    for row, example in zip(prepared.train.select(range(5)), rows):
        source = spec.columns.prompt_template.format(**example)
        assert row["input_ids"] == tokenizer(source)["input_ids"]
        assert row["labels"] == tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
    batch = Collator(tokenizer.pad_token_id)(
        [{"input_ids": [5, 6, 7, 8], "labels": [9, 3]}, {"input_ids": [5], "labels": [9, 10, 3]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[9, 3, IGNORE_INDEX], [9, 10, 3]]  # the targets' own width


def test_max_target_length_cuts_the_target_and_keeps_the_end_token(tokenizer, tiny_data) -> None:
    spec = data_spec("seq2seq_lm", tiny_data, max_target_length=2)
    spec.columns.prompt_template = None
    spec.columns.prompt, spec.columns.response = "answer", "question"  # long targets
    labels = prepare_data(spec, "seq2seq_lm", tokenizer).train["labels"]
    assert max(len(x) for x in labels) == 2 and all(x[-1] == tokenizer.eos_token_id for x in labels)


@pytest.mark.parametrize("arch", ["t5-s2s", "bart-s2s"])
def test_loss_sum_over_target_tokens_equals_the_models_own_mean_loss(arch: str, tokenizer) -> None:
    model = tiny_model(arch)
    batch = dict(tokenizer(["good film was fun", "bad"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([[8, 9, 3], [12, 3, IGNORE_INDEX]])
    out = model(**batch)  # the model shifts the labels into the decoder's input itself
    total, count = TASK.loss_sum(out.logits, batch)
    assert int(count) == 5 == TASK.units(batch)
    torch.testing.assert_close(total / count, out.loss)


def test_a_method_without_encoder_decoder_support_is_refused_in_one_line(tiny_dirs, tiny_data, monkeypatch) -> None:
    """Every method supports encoder-decoders now; the refusal stays for one that would not."""
    assert all(m.supports_encoder_decoder for m in METHODS.values())
    monkeypatch.setitem(METHODS, "prefix_tuning", replace(METHODS["prefix_tuning"], supports_encoder_decoder=False))
    recipe = tiny_recipe(tiny_dirs["t5-s2s"], tiny_data, "seq2seq_lm")
    recipe["method"] = {"name": "prefix_tuning"}
    with pytest.raises(RecipeError) as exc:
        validate_recipe(recipe, source="r.yaml")
    usable = ", ".join(m.name for m in METHODS.values() if m.supports_encoder_decoder)
    assert "prefix_tuning" not in usable
    assert exc.value.lines == [
        (
            "r.yaml: method.name: prefix_tuning does not support encoder-decoder models (got task seq2seq_lm). "
            f"Use one of: {usable}."
        )
    ]


def test_seq2seq_columns_and_decoder_problems_are_reported_at_once(tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["t5-s2s"], tiny_data, "seq2seq_lm")
    recipe["data"]["columns"] = {"text": "question", "response": None}
    with pytest.raises(RecipeError) as exc:
        validate_recipe(recipe, source="r.yaml")
    assert exc.value.lines == [
        (
            "r.yaml: data.columns.text: not used by seq2seq_lm (got 'question'). "
            "Give the source as `prompt` or `prompt_template` and the target as `response`."
        ),
        (
            "r.yaml: data.columns.prompt: seq2seq_lm needs the source column's name (e.g. prompt: "
            "article), or a prompt_template."
        ),
        "r.yaml: data.columns.response: seq2seq_lm needs the target column's name (e.g. response: summary).",
    ]
    recipe = tiny_recipe(
        tiny_dirs["llama-lm"], tiny_data, "causal_lm", model={"name": str(tiny_dirs["llama-lm"]), "decoder": "x/y"}
    )
    with pytest.raises(RecipeError) as exc:
        validate_recipe(recipe, source="r.yaml")
    assert exc.value.lines == [
        (
            "r.yaml: model.decoder: builds an encoder-decoder, which task causal_lm does not use (got 'x/y'). "
            "Remove it, or set task: seq2seq_lm."
        )
    ]


def test_train_last_layers_is_refused_on_encoder_decoders() -> None:
    with pytest.raises(MethodError, match="is an encoder-decoder, with two stacks of blocks"):
        adapt(tiny_model("t5-s2s"), METHODS["full"], "seq2seq_lm", train_last_layers=1)


def test_decoder_key_builds_an_encoder_decoder_whose_new_cross_attention_trains(
    tiny_dirs: dict[str, Path], tokenizer, tiny_data
) -> None:
    folder = str(tiny_dirs["bert-cls"])
    torch.manual_seed(0)
    model = load_base_model(ModelSpec(name=folder, decoder=folder), TASK)
    assert isinstance(model, EncoderDecoderModel)
    assert (model.config.decoder_start_token_id, model.config.eos_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    encoder_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    adapt(model, METHODS["lora"], "seq2seq_lm", rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # New weights (cross-attention, the LM head's transform) train in full, as a classifier's head does.
    cross = {n for n, _ in model.named_parameters() if ".crossattention." in n or ".predictions.transform." in n}
    assert cross and cross <= trainable
    crossattention = {n: p.numel() for n, p in model.named_parameters() if ".crossattention." in n}
    assert saved_parameters(model, "crossattention") == sum(crossattention.values())  # as `peft inspect` counts them
    assert not any(".crossattention." in n and "lora_" in n for n in trainable), "trained in full, not adapted"
    excluded = context_for(model, TASK.head_modules).excluded_modules
    assert "decoder.cls.predictions.transform" in excluded and "decoder.bert.encoder.layer.1.crossattention" in excluded
    result = run_training(
        model, "seq2seq_lm", tokenizer, tiny_data, TrainSpec(batch_size=8, max_steps=8, log_every=1, seed=0)
    )
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(
        torch.equal(p, encoder_before[n])
        for n, p in model.encoder.named_parameters()
        if "lora_" not in n and n in encoder_before
    )


def test_bert2bert_lora_with_its_trained_cross_attention_loads_in_hf_peft(
    tiny_dirs: dict[str, Path], tokenizer, tmp_path: Path
) -> None:
    from peft import PeftModel

    from peftcli.models.adapters import adapter_config, method_state, save_adapter

    folder = str(tiny_dirs["bert-cls"])

    def base() -> torch.nn.Module:
        torch.manual_seed(0)  # the new cross-attention's initial values: the same in both
        return load_base_model(ModelSpec(name=folder, decoder=folder), TASK)

    model = base()
    params, adapted = adapt(model, METHODS["lora"], "seq2seq_lm", rank=4, alpha=8)
    randomize_trainable(model)
    batch = dict(tokenizer(["good film was fun", "bad"], padding=True, return_tensors="pt"))
    batch["decoder_input_ids"] = torch.tensor([[2, 8, 9], [2, 12, 0]])
    ours = logits(model, batch)
    lora = METHODS["lora"]
    save_adapter(
        tmp_path, method_state(lora, model, adapted), adapter_config(lora, params, adapted, TASK, folder, None)
    )
    theirs = PeftModel.from_pretrained(base(), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["t5-s2s", "bart-s2s"])
def test_prompt_tuning_matches_hf_peft_both_ways_and_in_generate(arch: str, tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel, PromptTuningConfig

    from peftcli.models.adapters import load_adapter
    from tests.methods.test_prompt_tuning import N, load_theirs, save_ours

    batch = sample_batch(arch, tokenizer)
    ours = save_ours("prompt_tuning", arch, tmp_path / "ours", batch, num_virtual_tokens=N)
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)

    config = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)
    expected, _ = load_theirs(arch, config, tmp_path / "theirs", batch)
    mine = tiny_model(arch)
    load_adapter(tmp_path / "theirs", mine, TASK)
    torch.testing.assert_close(logits(mine, batch), expected, rtol=1e-6, atol=1e-6)

    # generate calls the encoder itself: the prompt must reach it there too.
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "theirs")
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    settings = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "min_new_tokens": 6}
    settings |= {"return_dict_in_generate": True, "output_scores": True}  # tiny models often pick the same tokens
    with torch.no_grad():
        scores = torch.stack(mine.generate(**source, **settings).scores)
        torch.testing.assert_close(
            scores, torch.stack(theirs.generate(**source, **settings).scores), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(scores, torch.stack(tiny_model(arch).generate(**source, **settings).scores))


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("arch", ["t5-s2s", "bart-s2s"])
def test_p_tuning_matches_hf_peft_both_ways_and_in_generate(arch: str, encoder: str, tokenizer, tmp_path: Path) -> None:
    """HF peft runs its encoder over 2n tokens (n per stack; an LSTM reads them as one sequence), feeds
    the encoder the first n and saves all 2n; ours does the same."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from peftcli.models.adapters import load_adapter
    from tests.methods.test_p_tuning import ENCODERS, N, hf_config
    from tests.methods.test_prompt_tuning import load_theirs, save_ours, trainable_count

    batch = sample_batch(arch, tokenizer)
    ours = save_ours("p_tuning", arch, tmp_path / "ours", batch, num_virtual_tokens=N, **ENCODERS[encoder])
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors")["prompt_embeddings"].shape[0] == 2 * N
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)

    expected, n_trainable = load_theirs(arch, hf_config("SEQ_2_SEQ_LM", ENCODERS[encoder]), tmp_path / "theirs", batch)
    mine = tiny_model(arch)
    load_adapter(tmp_path / "theirs", mine, TASK)
    torch.testing.assert_close(logits(mine, batch), expected, rtol=1e-6, atol=1e-6)
    fresh = tiny_model(arch)
    adapt(fresh, METHODS["p_tuning"], TASK.name, num_virtual_tokens=N, **ENCODERS[encoder])
    assert trainable_count(fresh) == n_trainable  # the encoder over 2n tokens, as HF peft's

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "theirs")
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    settings = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "min_new_tokens": 6}
    settings |= {"return_dict_in_generate": True, "output_scores": True}
    with torch.no_grad():
        scores = torch.stack(mine.generate(**source, **settings).scores)
        torch.testing.assert_close(
            scores, torch.stack(theirs.generate(**source, **settings).scores), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("arch", ["t5-s2s", "bart-s2s"])
def test_prefix_tuning_matches_hf_peft_with_a_decoder_mask_and_in_generate(
    arch: str, tokenizer, tmp_path: Path
) -> None:
    """The prefix reaches the decoder's self-attention only, with n ones in front of a given decoder mask;
    `generate` puts it into its own cache at the first step, as HF peft's prepare_inputs_for_generation
    does. (Both ways on plain batches, and with the projection: tests/methods/test_prefix_tuning.py.)"""
    from peft import PeftModel

    from tests.methods.test_prefix_tuning import save_ours, trained_ours

    model, params, adapted = trained_ours(arch, {"num_virtual_tokens": 5})
    save_ours(model, params, adapted, TASK.name, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    batch = sample_batch(arch, tokenizer)
    batch["decoder_attention_mask"] = (batch["decoder_input_ids"] != 0).long()
    batch["decoder_attention_mask"][:, 0] = 1  # T5's start token is the pad id
    ours = logits(model, batch)
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours, logits(tiny_model(arch), batch), atol=1e-3)

    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    settings = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "min_new_tokens": 6}
    settings |= {"return_dict_in_generate": True, "output_scores": True}
    with torch.no_grad():
        scores = torch.stack(model.generate(**source, **settings).scores)
        torch.testing.assert_close(
            scores, torch.stack(theirs.generate(**source, **settings).scores), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(scores, torch.stack(tiny_model(arch).generate(**source, **settings).scores))
