"""Token classification (NER) on a tiny BERT tagger with a WordPiece tokenizer: tag alignment to
sub-tokens, every method against the task (trains only its parameters and the head, logits line up
with the labels, save/load and merge keep outputs), training lowers the loss, and HF peft interop
for TOKEN_CLS in both directions."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

from peftcli.config.schema import DataSpec, OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.data.batching import Collator, eval_loader, train_loader
from peftcli.data.prepare import prepare_data
from peftcli.data.tokenize import tokenize_tokens
from peftcli.methods import METHODS, Kind
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import IGNORE_INDEX, TASKS
from peftcli.training.evaluation import evaluate
from peftcli.training.loop import train
from tests.conftest import NER_TAGS, bert_tagger, make_wordpiece_tokenizer
from tests.helpers import adapt, randomize_trainable

TASK = TASKS["token_classification"]
HF_PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")


def spec(tiny_ner: dict[str, Path], **kw) -> DataSpec:
    files = {"train": [str(tiny_ner["train"])], "validation": [str(tiny_ner["validation"])]}
    return DataSpec(files=files, columns={"tokens": "tokens", "tags": "tags"}, max_length=32, **kw)


@pytest.fixture(scope="module")
def batch(tiny_ner: dict[str, Path]) -> dict[str, torch.Tensor]:
    data = prepare_data(spec(tiny_ner), TASK.name, make_wordpiece_tokenizer())
    return Collator(0)([data.train[i] for i in range(8)])


def test_first_sub_token_of_each_word_carries_its_tag() -> None:
    rows = datasets.Dataset.from_list(
        [{"tokens": ["Zorvath", "Quenby", "lives", "in", "Paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}]
    )
    s = DataSpec(files={"train": ["x.jsonl"]}, columns={"tokens": "tokens", "tags": "tags"})
    out = tokenize_tokens(rows, s, make_wordpiece_tokenizer(), NER_TAGS, "train")[0]
    tag = {t: i for i, t in enumerate(NER_TAGS)}
    x = IGNORE_INDEX
    # [CLS] zor ##va ##th qu ##en ##by lives in paris [SEP]
    assert out["labels"] == [x, tag["B-PER"], x, x, tag["I-PER"], x, x, tag["O"], tag["O"], tag["B-LOC"], x]
    assert out["num_words"] == 5
    # Cut by max_length: the words past it get no label at all.
    short = tokenize_tokens(
        rows, s.model_copy(update={"max_length": 4}), make_wordpiece_tokenizer(), NER_TAGS, "train"
    )[0]
    assert short["labels"] == [x, tag["B-PER"], x, x]


def test_tag_names_are_sorted_with_o_first(tiny_ner: dict[str, Path]) -> None:
    assert prepare_data(spec(tiny_ner), TASK.name, make_wordpiece_tokenizer()).label_names == NER_TAGS


@pytest.mark.parametrize("method_name", list(METHODS))
def test_every_method_trains_its_parameters_and_the_head(
    method_name: str, batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """A fresh adapter reproduces the base model; training changes exactly the trainable set, which
    holds the head; the logits have one row per input position (virtual tokens stripped), so the loss
    sees every label; save/load and merge keep the outputs."""
    method = METHODS[method_name]
    model = bert_tagger()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = _logits(model, inputs)
    params, adapted = adapt(model, method, TASK.name)
    if method.kind is not Kind.VIRTUAL_TOKENS:  # virtual tokens change the input by design
        assert torch.equal(_logits(model, inputs), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".classifier." in f".{n}" for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(
        2
    ):  # two steps: an adapter whose up-projection starts at zero moves its down-projection on the second
        out = model(**inputs).logits
        assert out.shape == (*batch["input_ids"].shape, len(NER_TAGS))
        loss, count = TASK.loss_sum(out, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    # The adapter saves and loads with equal outputs.
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    save_adapter(
        tmp_path, method_state(method, model, adapted), adapter_config(method, params, adapted, TASK, "tiny", None)
    )
    fresh = bert_tagger()
    load_adapter(tmp_path, fresh, TASK)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
        if method.merge is not None:
            method.merge(model)
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_training_lowers_the_loss_and_raises_entity_f1(tiny_ner: dict[str, Path]) -> None:
    tokenizer = make_wordpiece_tokenizer()
    data = prepare_data(spec(tiny_ner), TASK.name, tokenizer)
    model = bert_tagger()
    adapt(model, METHODS["lora"], TASK.name)
    evals = eval_loader(data.eval, 0, 16)
    accelerator = Accelerator(cpu=True)
    first = evaluate(model, evals, TASK, accelerator, data.label_names).metrics
    spec_ = TrainSpec(batch_size=8, max_steps=16, log_every=1, eval_every=16, seed=0)
    loader = train_loader(data.train, 0, 8, 1, True, 0)
    result = train(
        model=model,
        task=TASK,
        train_data=loader,
        eval_data=evals,
        spec=spec_,
        optim=OptimizerSpec(lr=2e-2),
        schedule=ScheduleSpec(name="constant"),
        label_names=data.label_names,
        accelerator=accelerator,
    )
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert result.final_metrics["f1"] > first["f1"]
    assert result.final_metrics["accuracy"] > first["accuracy"]


# -- HF peft interop ---------------------------------------------------------------------------


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method_name", [m for m in METHODS if METHODS[m].in_hf_peft])
def test_our_adapter_loads_in_hf_peft_with_equal_logits(
    method_name: str, batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    method = METHODS[method_name]
    model = bert_tagger()
    params, adapted = adapt(model, method, TASK.name)
    randomize_trainable(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ours = _logits(model, inputs)
    save_adapter(
        tmp_path, method_state(method, model, adapted), adapter_config(method, params, adapted, TASK, "tiny", None)
    )
    theirs = _logits(PeftModel.from_pretrained(bert_tagger(), tmp_path), inputs)
    if method.kind is Kind.VIRTUAL_TOKENS and theirs.shape[1] != ours.shape[1]:
        theirs = theirs[:, theirs.shape[1] - ours.shape[1] :]  # HF peft returns the virtual positions too
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "dense"]),
        IA3Config(
            task_type="TOKEN_CLS", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
        PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3),
    ],
    ids=["lora", "ia3", "prompt_tuning"],
)
def test_hf_peft_adapter_loads_in_ours_with_equal_logits(
    config, batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    theirs = get_peft_model(bert_tagger(), config)
    randomize_trainable(theirs, seed=3)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = _logits(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = bert_tagger()
    load_adapter(tmp_path, ours, TASK)
    got = _logits(ours, inputs)
    torch.testing.assert_close(got, expected[:, expected.shape[1] - got.shape[1] :], rtol=1e-5, atol=1e-5)
