"""Prefix tuning against HF peft (the reference): the same prefixes give the same logits and the same
greedy generations, files go both ways, the projection MLP folds away exactly, padding changes nothing,
and what cannot work (gradient checkpointing, merging) is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file

from peftcli.commands.evaluate import run_eval
from peftcli.commands.merge import run_merge
from peftcli.config.load import load_recipe
from peftcli.config.schema import TrainSpec
from peftcli.errors import PeftcliError, RecipeError
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from peftcli.training.run import run_train
from tests.conftest import SINGLE_STACK, TINY, make_tokenizer, sample_batch, tiny_model, tiny_recipe
from tests.helpers import adapt, logits, randomize_trainable, run_training

METHOD = METHODS["prefix_tuning"]
ARCHS = SINGLE_STACK
INTEROP = [*SINGLE_STACK, "t5-s2s", "bart-s2s"]  # encoder-decoders: the decoder's self-attention, as HF peft
PLAIN = {"num_virtual_tokens": 5}
PROJECTED = {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16}
SETTINGS = pytest.mark.parametrize("settings", [PLAIN, PROJECTED], ids=["plain", "projection"])


def hf_config(task: str, settings: dict) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        task_type=TASKS[task].peft_task_type,
        num_virtual_tokens=settings["num_virtual_tokens"],
        prefix_projection=settings.get("prefix_projection", False),
        encoder_hidden_size=settings.get("encoder_hidden_size"),
    )


def save_ours(model: torch.nn.Module, params, adapted, task: str, folder: Path) -> None:
    save_adapter(
        folder, method_state(METHOD, model, adapted), adapter_config(METHOD, params, adapted, TASKS[task], "tiny", None)
    )


def trained_ours(arch: str, settings: dict, seed: int = 1) -> tuple[torch.nn.Module, object, object]:
    model = tiny_model(arch)
    params, adapted = adapt(model, METHOD, TINY[arch][1], **settings)
    randomize_trainable(model, seed=seed, scale=0.5)
    return model, params, adapted


# -- HF peft interop ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", INTEROP)
@SETTINGS
def test_our_prefix_loads_in_hf_peft_with_equal_outputs(arch: str, settings: dict, tokenizer, tmp_path: Path) -> None:
    model, params, adapted = trained_ours(arch, settings)
    batch = sample_batch(arch, tokenizer)
    ours = logits(model, batch)
    save_ours(model, params, adapted, TINY[arch][1], tmp_path)

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", INTEROP)
@SETTINGS
def test_hf_peft_prefix_loads_in_ours_with_equal_outputs(arch: str, settings: dict, tokenizer, tmp_path: Path) -> None:
    task = TINY[arch][1]
    theirs = get_peft_model(tiny_model(arch), hf_config(task, settings))
    randomize_trainable(theirs, seed=3, scale=0.5)
    batch = sample_batch(arch, tokenizer)
    expected = logits(theirs, batch)
    theirs.save_pretrained(tmp_path)

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, TASKS[task])
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", INTEROP)
@SETTINGS
def test_trainable_parameters_equal_hf_peft(arch: str, settings: dict) -> None:
    task = TINY[arch][1]
    theirs = get_peft_model(tiny_model(arch), hf_config(task, settings))
    ours = tiny_model(arch)
    adapt(ours, METHOD, task, **settings)
    n_trainable, _ = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_trainable


@pytest.mark.parametrize("arch", ["bert-cls", "llama-lm"])
def test_saved_files_match_hf_peft_layout(arch: str, tmp_path: Path) -> None:
    """Same tensor keys and shapes, same model-derived config (GQA: Llama's prefix has its 2 key/value heads)."""
    task = TINY[arch][1]
    get_peft_model(tiny_model(arch), hf_config(task, PROJECTED)).save_pretrained(tmp_path / "theirs")
    model, params, adapted = trained_ours(arch, PROJECTED)
    save_ours(model, params, adapted, task, tmp_path / "ours")

    shapes = [
        {k: tuple(v.shape) for k, v in load_file(tmp_path / who / "adapter_model.safetensors").items()}
        for who in ("theirs", "ours")
    ]
    assert shapes[0] == shapes[1]
    configs = [json.loads((tmp_path / who / "adapter_config.json").read_text()) for who in ("theirs", "ours")]
    for key in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_attention_heads",
        "num_layers",
        "num_transformer_submodules",
        "encoder_hidden_size",
        "prefix_projection",
        "init_weights",
        "inference_mode",
    ):
        assert configs[0][key] == configs[1][key], key


# -- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-lm", "gpt2-lm"])
@SETTINGS
def test_greedy_generation_equals_hf_peft(arch: str, settings: dict, tmp_path: Path) -> None:
    model, params, adapted = trained_ours(arch, settings, seed=5)
    save_ours(model, params, adapted, "causal_lm", tmp_path)
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    tok = make_tokenizer()
    prompt = tok(["good film was very", "what is"], return_tensors="pt", padding=True)

    def greedy(m: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)

    for row in range(2):  # one prompt at a time, as `peft eval --generate` asks
        ids = prompt["input_ids"][row : row + 1, : int(prompt["attention_mask"][row].sum())]
        ours = greedy(model, ids, torch.ones_like(ids))
        assert torch.equal(ours, greedy(theirs, ids, torch.ones_like(ids)))
    base = greedy(tiny_model(arch), ids, torch.ones_like(ids))
    assert not torch.equal(ours, base), "the prefix should change what the model generates"


def test_left_padded_batch_generation_equals_hf_peft(tmp_path: Path) -> None:
    model, params, adapted = trained_ours("llama-lm", PLAIN, seed=5)
    save_ours(model, params, adapted, "causal_lm", tmp_path)
    theirs = PeftModel.from_pretrained(tiny_model("llama-lm"), tmp_path).eval()
    tok = make_tokenizer()
    tok.padding_side = "left"
    batch = tok(["good film was very", "what is"], return_tensors="pt", padding=True)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), theirs.generate(**batch, **kwargs))


# -- behaviour of the prefix -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_rows_give_the_unpadded_outputs(arch: str, tokenizer) -> None:
    model, _, _ = trained_ours(arch, PLAIN)
    batch = sample_batch(arch, tokenizer)
    padded = logits(model, batch)
    lengths = batch["attention_mask"].sum(1)
    assert (lengths < batch["input_ids"].shape[1]).any(), "the sample batch must hold padded rows"
    for row, length in enumerate(lengths.tolist()):
        alone = logits(model, {k: v[row : row + 1, :length] for k, v in batch.items()})
        if TINY[arch][1] == "causal_lm":
            # The prefix adds no output positions: one logit row per input token.
            assert padded.shape[:2] == batch["input_ids"].shape
            torch.testing.assert_close(padded[row, :length], alone[0], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(padded[row], alone[0], rtol=1e-5, atol=1e-5)


def test_projection_folds_away_exactly(tokenizer, tmp_path: Path) -> None:
    for arch in ARCHS:
        model, params, adapted = trained_ours(arch, PROJECTED)
        batch = sample_batch(arch, tokenizer)
        before = logits(model, batch)
        state = method_state(METHOD, model, adapted)
        assert "prompt_embeddings" in state and not any("prefix_encoder" in k for k in state), "the MLP is not saved"
        save_ours(model, params, adapted, TINY[arch][1], tmp_path / arch)
        fresh = tiny_model(arch)
        load_adapter(tmp_path / arch, fresh, TASKS[TINY[arch][1]])
        assert torch.equal(logits(fresh, batch), before)


def test_prefix_changes_outputs_and_the_batch_shares_one_cache(tokenizer) -> None:
    """Each forward builds a fresh cache: calling the model twice gives the same logits."""
    model, _, _ = trained_ours("llama-lm", PLAIN)
    batch = sample_batch("llama-lm", tokenizer)
    first = logits(model, batch)
    assert torch.equal(logits(model, batch), first)
    assert not torch.allclose(first, logits(tiny_model("llama-lm"), batch))


def test_training_with_projection_trains_the_mlp_and_lowers_loss(tokenizer, tiny_data) -> None:
    model = tiny_model("llama-cls")
    adapt(model, METHOD, "sequence_classification", **PROJECTED)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"prefix_encoder.transform.0.weight", "prefix_encoder.transform.2.bias", "score.weight"} <= trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_training(
        model,
        "sequence_classification",
        tokenizer,
        tiny_data,
        TrainSpec(batch_size=8, max_steps=12, log_every=1, seed=0),
    )
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_bfloat16_mixed_precision_forward_and_backward(tokenizer) -> None:
    """As `peft train` runs it: accelerate wraps `model.forward` in autocast, so the prefix hook (run by
    `__call__` before forward) builds the cache outside autocast. (Wrapped here by hand: accelerate's
    state is process-wide and other tests fix it to full precision.)"""
    model = tiny_model("llama-lm")
    adapt(model, METHOD, "causal_lm")
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    model.train()
    out = model(**sample_batch("llama-lm", tokenizer)).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0


# -- refused options ---------------------------------------------------------------------------


def test_gradient_checkpointing_is_refused_at_validation(tiny_dirs, tiny_data, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_dirs["llama-lm"], tiny_data, "causal_lm")
    recipe["method"] = {"name": "prefix_tuning"}
    recipe["train"]["gradient_checkpointing"] = True
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.lines == [
        (
            f"{path}: train.gradient_checkpointing: prefix_tuning cannot train with gradient checkpointing (got true). "
            "Set it to false."
        )
    ]


def test_projection_size_without_projection_is_refused(tiny_dirs, tiny_data, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification")
    recipe["method"] = {"name": "prefix_tuning", "encoder_hidden_size": 64}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.lines == [
        (
            f"{path}: method.encoder_hidden_size: sizes the projection MLP, which prefix_projection: false leaves out; "
            "set prefix_projection: true or remove this key (got 64)."
        )
    ]


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        METHOD.params(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        METHOD.params(rank=8)


def test_adapter_for_another_base_model_is_refused(tmp_path: Path) -> None:
    model, params, adapted = trained_ours("llama-lm", PLAIN)
    save_ours(model, params, adapted, "causal_lm", tmp_path)
    with pytest.raises(PeftcliError, match=r"prompt_embeddings has shape \(5, 64\) but the model expects \(5, 128\)"):
        load_adapter(tmp_path, tiny_model("gpt2-lm"), TASKS["causal_lm"])


# -- the commands, end to end ------------------------------------------------------------------


def test_train_eval_generate_and_merge_refusal(tiny_dirs, tiny_data, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(tmp_path / "run"))
    recipe["method"] = {"name": "prefix_tuning", "num_virtual_tokens": 4}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_train(path, [])
    report = run_eval(run_dir, [], generate=2, max_new_tokens=4)
    trained = json.loads((run_dir / "report.json").read_text())["final_metrics"]
    assert report["metrics"]["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    lines = (run_dir / "eval-generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["prompt"].startswith("question :") for line in lines)
    with pytest.raises(PeftcliError, match="prefix_tuning adds trainable virtual tokens and cannot be merged"):
        run_merge(run_dir, tmp_path / "merged")


def test_seq2seq_train_eval_and_generate(tiny_dirs, tiny_data, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_dirs["t5-s2s"], tiny_data, "seq2seq_lm", output_dir=str(tmp_path / "run"))
    recipe["method"] = {"name": "prefix_tuning", "num_virtual_tokens": 4}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_train(path, [])
    report = run_eval(run_dir, [], generate=2, max_new_tokens=4)
    trained = json.loads((run_dir / "report.json").read_text())["final_metrics"]
    assert report["metrics"]["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert len((run_dir / "eval-generations.jsonl").read_text().splitlines()) == 2
