"""Data: label mapping, prompt masking and EOS, length-grouped batches, dynamic padding, file formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.config.schema import DataSpec
from peftcli.data.batching import Collator, GroupedBatchSampler
from peftcli.data.prepare import prepare_data
from peftcli.errors import DataError
from peftcli.tasks.registry import IGNORE_INDEX
from tests.conftest import write_jsonl


def spec(files: dict[str, Path], **kw) -> DataSpec:
    return DataSpec(files={k: [str(v)] for k, v in files.items()}, **kw)


def test_string_labels_map_to_sorted_ids(tmp_path: Path, tokenizer) -> None:
    rows = [{"t": "good film", "y": "pos"}, {"t": "bad film", "y": "neg"}, {"t": "fine", "y": "pos"}]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare_data(
        spec({"train": f, "validation": f}, columns={"text": "t", "label": "y"}), "sequence_classification", tokenizer
    )
    assert data.label_names == ["neg", "pos"]
    assert data.train["labels"] == [1, 0, 1]


def test_int_labels_keep_their_ids(tmp_path: Path, tokenizer) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", [{"t": "a", "y": 2}, {"t": "b", "y": 0}])
    data = prepare_data(
        spec({"train": f}, eval_split=None, columns={"text": "t", "label": "y"}), "sequence_classification", tokenizer
    )
    assert data.label_names == ["0", "1", "2"] and data.train["labels"] == [2, 0]


def test_eval_label_unseen_in_training_is_an_error(tmp_path: Path, tokenizer) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"t": "a", "y": "pos"}, {"t": "b", "y": "neg"}])
    ev = write_jsonl(tmp_path / "validation.jsonl", [{"t": "a", "y": "neutral"}])
    with pytest.raises(DataError) as info:
        prepare_data(
            spec({"train": train, "validation": ev}, columns={"text": "t", "label": "y"}),
            "sequence_classification",
            tokenizer,
        )
    assert (
        str(info.value)
        == "data.columns.label: label 'neutral' in split 'validation' is not one of the training split's labels "
        "(neg, pos). Fix the data or the label column."
    )


def test_missing_column_names_the_columns_there(tmp_path: Path, tokenizer) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "label": 0}])
    with pytest.raises(DataError) as info:
        prepare_data(
            spec({"train": f}, eval_split=None, columns={"text": "text", "label": "label"}),
            "sequence_classification",
            tokenizer,
        )
    assert (
        str(info.value) == "data.columns.text: column 'text' is not in split 'train' (columns: sentence, label). "
        "Set data.columns.text to one of them."
    )


def test_prompt_tokens_are_masked_and_eos_is_trained(tmp_path: Path, tokenizer) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", [{"q": "one plus one", "a": "two"}])
    s = spec({"train": f}, eval_split=None, columns={"prompt_template": "question : {q} answer :", "response": "a"})
    row = prepare_data(s, "causal_lm", tokenizer).train[0]
    prompt = tokenizer("question : one plus one answer :")["input_ids"]
    answer = tokenizer("two", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + answer + [tokenizer.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]


def test_text_column_trains_every_token_plus_eos(tmp_path: Path, tokenizer) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "the film was good"}])
    row = prepare_data(spec({"train": f}, eval_split=None, columns={"text": "text"}), "causal_lm", tokenizer).train[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_rows_whose_prompt_fills_max_length_are_dropped(tmp_path: Path, tokenizer) -> None:
    rows = [{"q": "one " * 20, "a": "two"}, {"q": "one", "a": "two"}]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    s = spec({"train": f}, eval_split=None, columns={"prompt": "q", "response": "a"}, max_length=8)
    data = prepare_data(s, "causal_lm", tokenizer)
    assert len(data.train) == 1 and data.dropped == {"train": 1}


def test_template_naming_a_missing_column(tmp_path: Path, tokenizer) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", [{"q": "x", "a": "y"}])
    s = spec({"train": f}, eval_split=None, columns={"prompt_template": "{question}", "response": "a"})
    with pytest.raises(
        DataError, match=r"data.columns.prompt_template \(\{question\}\): column 'question' is not in split 'train'"
    ):
        prepare_data(s, "causal_lm", tokenizer)


def test_tsv_with_quotes_loads_every_row(tmp_path: Path, tokenizer) -> None:
    f = tmp_path / "train.tsv"
    f.write_text('sentence\tlabel\n"quoted start\t1\nplain "middle" quote\t0\n')
    data = prepare_data(
        spec({"train": f}, eval_split=None, columns={"text": "sentence", "label": "label"}),
        "sequence_classification",
        tokenizer,
    )
    assert len(data.train) == 2


def test_empty_split_is_an_error(tmp_path: Path, tokenizer) -> None:
    f = tmp_path / "train.jsonl"
    f.write_text("")
    with pytest.raises(DataError):
        prepare_data(
            spec({"train": f}, eval_split=None, columns={"text": "t", "label": "y"}),
            "sequence_classification",
            tokenizer,
        )


@pytest.mark.parametrize("group", [True, False])
def test_sampler_covers_each_example_once_per_epoch(group: bool) -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(203)]
    sampler = GroupedBatchSampler(lengths, batch_size=8, grad_accum=4, group_by_length=group, seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(203))
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.mark.parametrize("group", [True, False])
def test_accumulation_windows_are_the_large_batches(group: bool) -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(203)]
    large = list(GroupedBatchSampler(lengths, 32, 1, group, seed=3))
    micro = list(GroupedBatchSampler(lengths, 8, 4, group, seed=3))
    windows = [[i for batch in micro[k : k + 4] for i in batch] for k in range(0, len(micro), 4)]
    assert [sorted(w) for w in windows] == [sorted(b) for b in large]


@pytest.mark.parametrize("accum", [1, 4])
def test_grouped_epochs_start_with_the_longest_example(accum: int) -> None:
    """The first optimizer step holds the longest example of the epoch (an out-of-memory shows at
    step 1), and the rest of the order still changes from epoch to epoch."""
    lengths = [(i * 37) % 120 + 4 for i in range(2000)]
    lengths[1234] = 500
    sampler = GroupedBatchSampler(lengths, 32 // accum, accum, group_by_length=True, seed=0)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert any(1234 in b for b in batches[:accum])
        orders.append(batches[accum:])
    assert orders[0] != orders[1]


def test_grouping_cuts_padding() -> None:
    lengths = [(i * 37) % 120 + 4 for i in range(2000)]

    def padded(group: bool) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in GroupedBatchSampler(lengths, 32, 1, group, seed=0))

    assert padded(True) < 0.6 * padded(False)


def test_collator_pads_right_with_masks() -> None:
    batch = Collator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
